//! SpendQuotas at the operator. Money, tokens and tool calls are the gateway service's to
//! enforce (it sees every call); Sessions are the operator's, because it is the one that starts
//! them: a Session past a quota's `concurrentSessions` or `sessions` per window waits
//! `Pending` (reason `QuotaWait`) until one ends or the window moves on.
//!
//! The Session starts a `sessions` limit counts are kept in the quota's own status (at most
//! the limit per window), which tenants cannot write — deleting a Session does not give its
//! start back. Starts are decided one namespace at a time, so two Sessions starting together
//! never both take the last place.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use contextos_crds::{
    Agent, PriceList, Session, SpendQuota,
    conditions::{self, reason},
    session::SessionPhase,
    spend_quota::{QuotaWindow, SessionStart, SpendQuotaStatus, UsageSummary},
};
use contextos_runner::quota::ActiveQuota;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, ResourceExt as _, api::ListParams, runtime::controller::Action};

use super::{Context, Result, apply_status, now};
use crate::conditions::{Wanted, merge};

/// How often a quota's running Sessions are counted again for its status.
const RECOUNT_EVERY: Duration = Duration::from_secs(30);
/// How soon a Session waiting for a quota asks again.
pub const WAIT_RECHECK: Duration = Duration::from_secs(5);

/// A Session the quota check sees: its name, uid and labels, and its Agent's labels.
#[derive(Clone, Debug, Default)]
pub struct SessionFacts {
    pub name: String,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub agent_labels: BTreeMap<String, String>,
}

/// Why a Session may not start now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaWait {
    pub quota: String,
    pub message: String,
}

/// Whether `starting` may start at `now` under `quotas`, with `running` the namespace's Sessions
/// running now (pure). `first` is whether this is the Session's first start (a resume after an
/// approval is not a new Session, and its start was counted).
pub fn may_start(
    quotas: &[SpendQuota],
    starting: &SessionFacts,
    running: &[SessionFacts],
    first: bool,
    now: Timestamp,
) -> Result<(), QuotaWait> {
    for quota in quotas {
        let spec = &quota.spec;
        if !spec.selects(&starting.agent_labels, &starting.labels) {
            continue;
        }
        let name = quota.name_any();
        if let Some(limit) = spec.concurrent_sessions {
            let selected: Vec<&str> = running
                .iter()
                .filter(|s| s.name != starting.name && spec.selects(&s.agent_labels, &s.labels))
                .map(|s| s.name.as_str())
                .collect();
            if selected.len() >= limit as usize {
                return Err(QuotaWait {
                    quota: name.clone(),
                    message: format!(
                        "SpendQuota {name} allows {limit} Sessions running at once and {} are ({}); this one starts when one of them ends",
                        selected.len(),
                        names(&selected)
                    ),
                });
            }
        }
        if !first {
            continue;
        }
        let starts = quota
            .status
            .as_ref()
            .map(|s| s.session_starts.as_slice())
            .unwrap_or_default();
        if starts.iter().any(|s| s.uid == starting.uid) {
            continue;
        }
        for limit in &spec.limits {
            let Some(max) = limit.sessions else { continue };
            let within = started_within(starts, limit.window, now);
            if within.len() >= max as usize {
                let next = within
                    .first()
                    .map(|at| at.saturating_add(jiff_span(limit.window)).unwrap_or(*at));
                return Err(QuotaWait {
                    quota: name.clone(),
                    message: format!(
                        "SpendQuota {name} allows {max} Sessions to start per {}; {} started in the last one{}",
                        limit.window.as_str(),
                        within.len(),
                        next.map(|n| format!("; the next may start at {n}"))
                            .unwrap_or_default()
                    ),
                });
            }
        }
    }
    Ok(())
}

fn names(names: &[&str]) -> String {
    let shown: Vec<&str> = names.iter().take(5).copied().collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

fn jiff_span(window: QuotaWindow) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_millis(window.millis())
}

/// When the starts of `starts` within `window` before `now` were, oldest first.
fn started_within(starts: &[SessionStart], window: QuotaWindow, now: Timestamp) -> Vec<Timestamp> {
    let since = now.saturating_sub(jiff_span(window)).unwrap_or(now);
    let mut within: Vec<Timestamp> = starts
        .iter()
        .filter_map(|s| s.at.parse::<Timestamp>().ok())
        .filter(|at| *at > since)
        .collect();
    within.sort();
    within
}

/// The starts a quota keeps: those within its longest `sessions` window (none without one).
fn kept_starts(quota: &SpendQuota, mut starts: Vec<SessionStart>, now: Timestamp) -> Vec<SessionStart> {
    let Some(longest) = quota
        .spec
        .limits
        .iter()
        .filter(|l| l.sessions.is_some())
        .map(|l| l.window)
        .max()
    else {
        return Vec::new();
    };
    let since = now.saturating_sub(jiff_span(longest)).unwrap_or(now);
    starts.retain(|s| s.at.parse::<Timestamp>().is_ok_and(|at| at > since));
    starts
}

/// The Sessions of `namespace` running now (with a live runner pod, or Running), and the
/// labels of its Agents.
async fn facts(
    ctx: &Context,
    namespace: &str,
) -> Result<(Vec<SessionFacts>, BTreeMap<String, BTreeMap<String, String>>)> {
    let agents: BTreeMap<String, BTreeMap<String, String>> =
        Api::<Agent>::namespaced(ctx.client.clone(), namespace)
            .list_metadata(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|a| (a.name_any(), a.labels().clone()))
            .collect();
    // Running is having a runner pod that has not ended — whatever the Session's status says
    // yet (its pod is made before its status is written, and that write may fail).
    let selector = format!("{}=runner", contextos_crds::labels::ROLE);
    let live: std::collections::BTreeSet<String> =
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(ctx.client.clone(), namespace)
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
            .into_iter()
            .filter(|p| {
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                !matches!(phase, Some("Succeeded" | "Failed"))
            })
            .filter_map(|p| p.labels().get(contextos_crds::labels::SESSION).cloned())
            .collect();
    let running = Api::<Session>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| {
            s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Running)
                || live.contains(&s.name_any())
        })
        .map(|s| SessionFacts {
            agent_labels: agents.get(&s.spec.agent_ref.name).cloned().unwrap_or_default(),
            name: s.name_any(),
            uid: s.uid().unwrap_or_default(),
            labels: s.labels().clone(),
        })
        .collect();
    Ok((running, agents))
}

/// The SpendQuotas of `namespace` (none where the kind is not installed).
async fn quotas_of(ctx: &Context, namespace: &str) -> Result<Vec<SpendQuota>> {
    match Api::<SpendQuota>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default())
        .await
    {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Whether any SpendQuota of `namespace` limits Sessions (most namespaces have none: their
/// starts need no lock).
pub async fn limits_sessions(ctx: &Context, namespace: &str) -> Result<bool> {
    Ok(quotas_of(ctx, namespace)
        .await?
        .iter()
        .any(|q| q.spec.concurrent_sessions.is_some() || q.spec.limits.iter().any(|l| l.sessions.is_some())))
}

/// Decides whether `session` may start now; if it may and this is its `first` start, counts
/// it in the quotas' `sessions` limits before saying so. The caller holds the namespace's start
/// lock until the Session is running (see [`Context::start_lock`]).
pub async fn admit_start(ctx: &Context, session: &Session, first: bool) -> Result<Result<(), QuotaWait>> {
    let namespace = session.namespace().unwrap_or_default();
    // Read again under the lock: the starts counted are the last start's too.
    let quotas = quotas_of(ctx, &namespace).await?;
    if quotas.is_empty() {
        return Ok(Ok(()));
    }
    let (running, agents) = facts(ctx, &namespace).await?;
    let starting = SessionFacts {
        name: session.name_any(),
        uid: session.uid().unwrap_or_default(),
        labels: session.labels().clone(),
        agent_labels: agents
            .get(&session.spec.agent_ref.name)
            .cloned()
            .unwrap_or_default(),
    };
    let at = now();
    if let Err(wait) = may_start(&quotas, &starting, &running, first, at) {
        return Ok(Err(wait));
    }
    if first {
        for quota in quotas.iter().filter(|q| {
            q.spec.limits.iter().any(|l| l.sessions.is_some())
                && q.spec.selects(&starting.agent_labels, &starting.labels)
        }) {
            let mut starts = quota
                .status
                .as_ref()
                .map(|s| s.session_starts.clone())
                .unwrap_or_default();
            if starts.iter().any(|s| s.uid == starting.uid) {
                continue;
            }
            starts.push(SessionStart {
                session: starting.name.clone(),
                uid: starting.uid.clone(),
                at: at.to_string(),
            });
            let running_now = count_selected(quota, &running);
            // Written before the Session starts: a start is never lost, at worst counted for a
            // Session whose pod then failed to be made (it starts on its next pass, counted once).
            write_operator_status(ctx, quota, kept_starts(quota, starts, at), running_now, None).await?;
        }
    }
    Ok(Ok(()))
}

fn count_selected(quota: &SpendQuota, running: &[SessionFacts]) -> u32 {
    let n = running
        .iter()
        .filter(|s| quota.spec.selects(&s.agent_labels, &s.labels))
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Writes the operator's part of a quota's status (the gateway writes its usage beside it):
/// conditions (kept as they are when `ready` is none), Session starts, Sessions running.
async fn write_operator_status(
    ctx: &Context,
    quota: &SpendQuota,
    starts: Vec<SessionStart>,
    running: u32,
    ready: Option<&Wanted>,
) -> Result<()> {
    let previous = quota
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let conditions = match ready {
        Some(ready) => merge(
            &previous,
            std::slice::from_ref(ready),
            quota.metadata.generation,
            now(),
        ),
        None => previous,
    };
    let at = now();
    let sessions_column = quota
        .spec
        .limits
        .iter()
        .filter_map(|l| l.sessions.map(|max| (l.window, max)))
        .max_by_key(|(window, max)| {
            let used = started_within(&starts, *window, at).len() as u64;
            used * 1000 / u64::from((*max).max(1))
        })
        .map(|(window, max)| {
            format!(
                "{}/{max} ({})",
                started_within(&starts, window, at).len(),
                window.as_str()
            )
        });
    let running_column = quota
        .spec
        .concurrent_sessions
        .map(|max| format!("{running}/{max}"));
    // Only the operator's fields: the gateway's (`usage`, `measuredAt`, the summary's spend,
    // tokens and tool calls) are left out, so server-side apply leaves them to their owner.
    let status = SpendQuotaStatus {
        observed_generation: quota.metadata.generation,
        conditions,
        session_starts: starts,
        running_sessions: Some(running),
        summary: Some(UsageSummary {
            sessions: sessions_column,
            running: running_column,
            ..UsageSummary::default()
        }),
        ..SpendQuotaStatus::default()
    };
    let namespace = quota.namespace().unwrap_or_default();
    apply_status(
        &Api::<SpendQuota>::namespaced(ctx.client.clone(), &namespace),
        quota,
        status,
    )
    .await
}

/// Reconciles a SpendQuota: Ready when the gateway can enforce it, and the Sessions it counts.
pub async fn reconcile_spend_quota(quota: Arc<SpendQuota>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile("SpendQuota");
    let namespace = quota.namespace().unwrap_or_default();
    let previous = quota
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let currencies: Vec<String> = match Api::<PriceList>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items.into_iter().map(|l| l.spec.currency).collect(),
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let ready = readiness(&quota, &currencies);
    {
        // Starts are decided under the namespace's lock: the count written here is theirs too.
        let lock = ctx.start_lock(&namespace);
        let _held = lock.lock().await;
        let Some(fresh) = Api::<SpendQuota>::namespaced(ctx.client.clone(), &namespace)
            .get_opt(&quota.name_any())
            .await?
        else {
            return Ok(Action::await_change());
        };
        let (running, _) = facts(&ctx, &namespace).await?;
        let starts = fresh
            .status
            .as_ref()
            .map(|s| s.session_starts.clone())
            .unwrap_or_default();
        let count = count_selected(&fresh, &running);
        write_operator_status(
            &ctx,
            &fresh,
            kept_starts(&fresh, starts, now()),
            count,
            Some(&ready),
        )
        .await?;
    }
    super::announce(&ctx, quota.as_ref(), &previous, &ready).await;
    Ok(Action::requeue(RECOUNT_EVERY))
}

/// The Ready condition a quota earns (pure): `currencies` are those the cluster's PriceLists
/// price in.
fn readiness(quota: &SpendQuota, currencies: &[String]) -> Wanted {
    let active = match ActiveQuota::compile(quota) {
        Ok(active) => active,
        Err(e) => return Wanted::new(conditions::READY, false, reason::INVALID_SPEC, e),
    };
    if let Some(currency) = &active.currency
        && !currencies.contains(currency)
    {
        return Wanted::new(
            conditions::READY,
            false,
            reason::PRICE_MISSING,
            format!(
                "spec.limits: spend is counted at PriceList prices and no PriceList prices in {currency}, so every model call this quota selects is refused; create one (examples/pricing/pricelist.yaml) or remove the spend limits"
            ),
        );
    }
    let mut limits: Vec<String> = active
        .limits
        .iter()
        .map(|l| {
            format!(
                "{} {} per {}",
                contextos_runner::quota::amount_text(l.resource, l.max),
                l.resource.as_str(),
                l.window.as_str()
            )
        })
        .collect();
    limits.extend(quota.spec.limits.iter().filter_map(|l| {
        l.sessions
            .map(|max| format!("{max} Sessions started per {}", l.window.as_str()))
    }));
    if let Some(max) = quota.spec.concurrent_sessions {
        limits.push(format!("{max} Sessions at once"));
    }
    Wanted::new(
        conditions::READY,
        true,
        reason::RESOLVED,
        format!("enforced: {}", limits.join(", ")),
    )
}

#[cfg(test)]
mod tests {
    use contextos_crds::SpendQuotaSpec;

    use super::*;

    fn quota(name: &str, spec: &str, starts: &[(&str, &str)]) -> SpendQuota {
        let spec: SpendQuotaSpec = serde_yaml::from_str(spec).expect("spec");
        let mut quota = SpendQuota::new(name, spec);
        quota.metadata.namespace = Some("shop".into());
        quota.status = Some(contextos_crds::SpendQuotaStatus {
            session_starts: starts
                .iter()
                .map(|(uid, at)| SessionStart {
                    session: format!("s-{uid}"),
                    uid: (*uid).into(),
                    at: (*at).into(),
                })
                .collect(),
            ..Default::default()
        });
        quota
    }

    fn session(name: &str, labels: &[(&str, &str)]) -> SessionFacts {
        SessionFacts {
            name: name.into(),
            uid: format!("uid-{name}"),
            labels: labels.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            agent_labels: BTreeMap::new(),
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().expect("time")
    }

    #[test]
    fn the_session_past_a_concurrency_limit_waits_naming_the_quota_and_who_runs() {
        let quotas = [quota("tenant", "concurrentSessions: 2", &[])];
        let now = at("2026-12-04T10:00:00Z");
        let running = [session("a", &[]), session("b", &[])];
        let wait = may_start(&quotas, &session("c", &[]), &running, true, now).expect_err("waits");
        assert_eq!(wait.quota, "tenant");
        assert!(
            wait.message
                .contains("allows 2 Sessions running at once and 2 are (a, b)"),
            "{}",
            wait.message
        );
        assert_eq!(
            may_start(&quotas, &session("c", &[]), &running[..1], true, now),
            Ok(())
        );
        // A Session already running (its resume) does not count against itself.
        assert_eq!(
            may_start(&quotas, &session("b", &[]), &running, false, now),
            Ok(())
        );
    }

    #[test]
    fn a_team_quota_counts_only_its_teams_sessions() {
        let quotas = [quota(
            "team",
            "sessionSelector: {matchLabels: {team: pay}}\nconcurrentSessions: 1",
            &[],
        )];
        let now = at("2026-12-04T10:00:00Z");
        let running = [
            session("a", &[("team", "pay")]),
            session("b", &[("team", "search")]),
        ];
        assert!(may_start(&quotas, &session("c", &[("team", "pay")]), &running, true, now).is_err());
        assert_eq!(
            may_start(&quotas, &session("c", &[("team", "search")]), &running, true, now),
            Ok(())
        );
    }

    #[test]
    fn sessions_per_window_count_starts_within_it_and_never_a_resume() {
        let quotas = [quota(
            "tenant",
            "limits:\n- window: hour\n  sessions: 2",
            &[
                ("u1", "2026-12-04T08:30:00Z"),
                ("u2", "2026-12-04T09:10:00Z"),
                ("u3", "2026-12-04T09:40:00Z"),
            ],
        )];
        let wait = may_start(
            &quotas,
            &session("new", &[]),
            &[],
            true,
            at("2026-12-04T10:00:00Z"),
        )
        .expect_err("two started in the last hour");
        assert!(
            wait.message
                .contains("allows 2 Sessions to start per hour; 2 started"),
            "{}",
            wait.message
        );
        assert!(
            wait.message
                .contains("the next may start at 2026-12-04T10:10:00Z"),
            "{}",
            wait.message
        );
        assert_eq!(
            may_start(
                &quotas,
                &session("new", &[]),
                &[],
                true,
                at("2026-12-04T10:10:01Z")
            ),
            Ok(())
        );
        // A Session whose start is counted (its resume) or that resumes is not a new start.
        assert_eq!(
            may_start(
                &quotas,
                &session("new", &[]),
                &[],
                false,
                at("2026-12-04T10:00:00Z")
            ),
            Ok(())
        );
    }

    #[test]
    fn a_quota_is_ready_only_when_the_gateway_can_enforce_it() {
        let spend = quota(
            "money",
            "limits:\n- window: day\n  spend: {amount: \"5\", currency: USD}",
            &[],
        );
        assert_eq!(readiness(&spend, &[]).reason, reason::PRICE_MISSING);
        assert_eq!(
            readiness(&spend, &["EUR".to_owned()]).reason,
            reason::PRICE_MISSING
        );
        let ready = readiness(&spend, &["USD".to_owned()]);
        assert!(ready.status, "{}", ready.message);
        assert_eq!(ready.message, "enforced: 5.00 spend per day");
    }
}
