//! Which tools a model turn is offered, given every tool's relevance score: pure, so a replay
//! that is handed the same scores offers the same tools.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// One of the Agent's tools as the selection sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate<'a> {
    pub name: &'a str,
    /// How well the tool fits the turn's intent (higher is better; any scale).
    pub score: f32,
    /// What offering it costs: tokens of its name, description and input schema.
    pub schema_tokens: u32,
}

/// How much a turn is offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// At most this many tools chosen by score (the always-offered ones come on top).
    pub top_k: u32,
    /// At most this many tokens of tool schemas in all, the always-offered ones included.
    pub schema_tokens: u32,
}

/// Why a tool was offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfferReason {
    /// Named in the Agent's always-offer list.
    Always,
    /// Among the best scores.
    Ranked,
}

/// A tool a turn was offered, with its score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub tool: String,
    pub score: f32,
    pub reason: OfferReason,
}

/// What one turn was offered and what it was not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// In the order the model is shown them: always-offered first, then best score first.
    pub offered: Vec<Offer>,
    /// Tools a policy denies outright: never offered, whatever their score.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied: Vec<String>,
    /// Tools that scored high enough but did not fit the schema token budget.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub over_budget: Vec<String>,
}

impl Selection {
    /// Whether `tool` was offered.
    pub fn offers(&self, tool: &str) -> bool {
        self.offered.iter().any(|o| o.tool == tool)
    }

    /// The names of the tools offered.
    pub fn offered_names(&self) -> std::collections::BTreeSet<String> {
        self.offered.iter().map(|o| o.tool.clone()).collect()
    }

    /// Checks a selection someone else made (a runner pod's, before the gateway records it)
    /// against the run's catalog: every tool named is one of `catalog`, none twice, scores
    /// finite and bounded, and the tools held back as denied exactly those the policies deny
    /// outright (`denied`) — so the record names nothing but the Agent's tools, and says
    /// truthfully which were never offered.
    pub fn check(&self, catalog: &BTreeSet<&str>, denied: &BTreeSet<String>) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let named = self
            .offered
            .iter()
            .map(|o| o.tool.as_str())
            .chain(self.denied.iter().map(String::as_str))
            .chain(self.over_budget.iter().map(String::as_str));
        for tool in named {
            if !catalog.contains(tool) {
                return Err(format!(
                    "tools_offered names {:?}, which is not a tool of the run's Agent",
                    tool.chars().take(64).collect::<String>()
                ));
            }
            if !seen.insert(tool) {
                return Err(format!("tools_offered names {tool} twice"));
            }
        }
        if let Some(offer) = self
            .offered
            .iter()
            .find(|o| !o.score.is_finite() || o.score.abs() > MAX_SCORE)
        {
            return Err(format!("tools_offered gives {} a score out of range", offer.tool));
        }
        let held: BTreeSet<&str> = self.denied.iter().map(String::as_str).collect();
        if held != denied.iter().map(String::as_str).collect() {
            return Err(
                "tools_offered.denied is not the set of tools the run's policies deny outright".into(),
            );
        }
        Ok(())
    }

    /// Checks that a selection someone else made has the shape the Agent's discovery gives
    /// one: every always-offered tool of `catalog` not `denied` offered as such (a hostile
    /// runner cannot hide the tool that hands over to a person), nothing else offered as
    /// always-offered, and at most `top_k` tools chosen by score.
    pub fn check_shape(
        &self,
        catalog: &BTreeSet<&str>,
        denied: &BTreeSet<String>,
        always: &BTreeSet<&str>,
        top_k: u32,
    ) -> Result<(), String> {
        if let Some(missing) = always
            .iter()
            .filter(|t| catalog.contains(*t) && !denied.contains(**t))
            .find(|t| {
                !self
                    .offered
                    .iter()
                    .any(|o| o.tool == **t && o.reason == OfferReason::Always)
            })
        {
            return Err(format!(
                "tools_offered leaves out {missing}, which the Agent offers on every turn (spec.discovery.alwaysOffer)"
            ));
        }
        if let Some(claimed) = self
            .offered
            .iter()
            .find(|o| o.reason == OfferReason::Always && !always.contains(o.tool.as_str()))
        {
            return Err(format!(
                "tools_offered offers {} as always offered, which spec.discovery.alwaysOffer does not name",
                claimed.tool
            ));
        }
        let ranked = self
            .offered
            .iter()
            .filter(|o| o.reason == OfferReason::Ranked)
            .count();
        if ranked > top_k as usize {
            return Err(format!(
                "tools_offered offers {ranked} tools by score, more than spec.discovery.topK ({top_k})"
            ));
        }
        Ok(())
    }
}

/// No resolver scores beyond this (cosine similarities are within [-1, 1], BM25 scores of
/// bounded text far below it).
const MAX_SCORE: f32 = 1.0e4;

/// Chooses the tools for one turn: every always-offered tool (unless denied), then the best
/// scores (ties by name, so the choice never depends on the order tools were listed) while
/// they fit `limits`; a tool too large for the room left is skipped, a smaller one after it
/// may still fit. Denied tools are never offered.
pub fn select(
    candidates: &[Candidate<'_>],
    always: &BTreeSet<String>,
    denied: &BTreeSet<String>,
    limits: Limits,
) -> Selection {
    let mut selection = Selection {
        denied: candidates
            .iter()
            .filter(|c| denied.contains(c.name))
            .map(|c| c.name.to_owned())
            .collect(),
        ..Selection::default()
    };
    let allowed = candidates.iter().filter(|c| !denied.contains(c.name));
    let mut room = limits.schema_tokens;
    let (pinned, mut ranked): (Vec<_>, Vec<_>) = allowed.partition(|c| always.contains(c.name));
    for tool in pinned {
        room = room.saturating_sub(tool.schema_tokens);
        selection.offered.push(offer(tool, OfferReason::Always));
    }
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.name.cmp(b.name)));
    let mut chosen = 0;
    for tool in ranked {
        if chosen == limits.top_k {
            break;
        }
        if tool.schema_tokens > room {
            selection.over_budget.push(tool.name.to_owned());
            continue;
        }
        room -= tool.schema_tokens;
        chosen += 1;
        selection.offered.push(offer(tool, OfferReason::Ranked));
    }
    selection
}

fn offer(tool: &Candidate<'_>, reason: OfferReason) -> Offer {
    Offer {
        tool: tool.name.to_owned(),
        // Recorded as JSON, which has no NaN.
        score: if tool.score.is_finite() { tool.score } else { 0.0 },
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> Vec<Candidate<'static>> {
        [
            ("get-pod-logs", 0.9, 100),
            ("restart-deployment", 0.8, 100),
            ("delete-namespace", 0.95, 100),
            ("list-invoices", 0.1, 100),
            ("huge-tool", 0.85, 5_000),
            ("escalate", 0.0, 50),
        ]
        .into_iter()
        .map(|(name, score, schema_tokens)| Candidate {
            name,
            score,
            schema_tokens,
        })
        .collect()
    }

    #[test]
    fn a_selection_made_elsewhere_names_only_the_catalog_once_and_the_true_denials() {
        let limits = Limits {
            top_k: 3,
            schema_tokens: 10_000,
        };
        let denied = set(&["delete-namespace"]);
        let chosen = select(&candidates(), &set(&[]), &denied, limits);
        let catalog: BTreeSet<&str> = candidates().iter().map(|c| c.name).collect();
        assert_eq!(chosen.check(&catalog, &denied), Ok(()));
        let mut forged = chosen.clone();
        forged.offered[0].tool = "ana.lopez/1980-03-12".into();
        assert!(
            forged
                .check(&catalog, &denied)
                .is_err_and(|e| e.contains("not a tool"))
        );
        let mut twice = chosen.clone();
        twice.over_budget.push(twice.offered[0].tool.clone());
        assert!(twice.check(&catalog, &denied).is_err_and(|e| e.contains("twice")));
        let mut hidden = chosen.clone();
        hidden.denied.clear();
        assert!(
            hidden
                .check(&catalog, &denied)
                .is_err_and(|e| e.contains("deny outright"))
        );
        let mut wild = chosen;
        wild.offered[0].score = 3.0e38;
        assert!(
            wild.check(&catalog, &denied)
                .is_err_and(|e| e.contains("out of range"))
        );
    }

    /// A selection a runner made has the discovery's shape: the always-offered tool it may not
    /// hide, nothing passed off as always offered, no more tools by score than topK.
    #[test]
    fn a_selection_made_elsewhere_offers_the_always_offered_tools_and_at_most_top_k() {
        let limits = Limits {
            top_k: 2,
            schema_tokens: 10_000,
        };
        let denied = set(&["delete-namespace"]);
        let always = set(&["escalate"]);
        let always_names: BTreeSet<&str> = always.iter().map(String::as_str).collect();
        let catalog: BTreeSet<&str> = candidates().iter().map(|c| c.name).collect();
        let chosen = select(&candidates(), &always, &denied, limits);
        let shape = |s: &Selection| s.check_shape(&catalog, &denied, &always_names, limits.top_k);
        assert_eq!(shape(&chosen), Ok(()));
        let mut hidden = chosen.clone();
        hidden.offered.retain(|o| o.tool != "escalate");
        assert!(shape(&hidden).is_err_and(|e| e.contains("leaves out escalate")));
        let mut passed_off = chosen.clone();
        passed_off.offered[1].reason = OfferReason::Always;
        assert!(shape(&passed_off).is_err_and(|e| e.contains("does not name")));
        let mut more = chosen.clone();
        more.offered.push(Offer {
            tool: "list-invoices".into(),
            score: 0.1,
            reason: OfferReason::Ranked,
        });
        assert!(shape(&more).is_err_and(|e| e.contains("more than spec.discovery.topK")));
        // An always-offered tool a policy denies outright is not offered, and need not be.
        let strict = set(&["escalate"]);
        let without = select(&candidates(), &always, &strict, limits);
        assert_eq!(
            without.check_shape(&catalog, &strict, &always_names, limits.top_k),
            Ok(())
        );
    }

    fn names(selection: &Selection) -> Vec<&str> {
        selection.offered.iter().map(|o| o.tool.as_str()).collect()
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_best_scores_are_offered_after_the_always_offered_tools() {
        let limits = Limits {
            top_k: 2,
            schema_tokens: 10_000,
        };
        let chosen = select(&candidates(), &set(&["escalate"]), &set(&[]), limits);
        assert_eq!(names(&chosen), ["escalate", "delete-namespace", "get-pod-logs"]);
        assert_eq!(chosen.offered[0].reason, OfferReason::Always);
    }

    #[test]
    fn denied_tools_are_never_offered_even_when_pinned_or_best() {
        let limits = Limits {
            top_k: 3,
            schema_tokens: 10_000,
        };
        let denied = set(&["delete-namespace", "escalate"]);
        let chosen = select(&candidates(), &set(&["escalate"]), &denied, limits);
        assert_eq!(
            names(&chosen),
            ["get-pod-logs", "huge-tool", "restart-deployment"]
        );
        assert_eq!(chosen.denied, ["delete-namespace", "escalate"]);
    }

    #[test]
    fn a_tool_larger_than_the_room_left_is_skipped_for_smaller_ones() {
        let limits = Limits {
            top_k: 3,
            schema_tokens: 350,
        };
        let chosen = select(&candidates(), &set(&["escalate"]), &set(&[]), limits);
        assert_eq!(
            names(&chosen),
            [
                "escalate",
                "delete-namespace",
                "get-pod-logs",
                "restart-deployment"
            ]
        );
        assert_eq!(chosen.over_budget, ["huge-tool"]);
    }

    #[test]
    fn the_choice_does_not_depend_on_the_order_tools_are_listed() {
        let limits = Limits {
            top_k: 2,
            schema_tokens: 10_000,
        };
        let mut tied = candidates();
        for c in &mut tied {
            c.score = 0.5;
        }
        let forward = select(&tied, &set(&[]), &set(&[]), limits);
        tied.reverse();
        assert_eq!(select(&tied, &set(&[]), &set(&[]), limits), forward);
        assert_eq!(names(&forward), ["delete-namespace", "escalate"]);
    }
}
