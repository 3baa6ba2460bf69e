//! Command-line structure shared by every subcommand: where data lives and which tenant.

mod audit;
mod autotune;
mod capability;
mod consent;
mod cost;
mod digest;
mod feedback;
mod gateway;
mod insights;
mod memory;
mod promote;
mod propose;
mod records;
mod replay;
mod run;
mod session_run;
mod skill;
mod subject;
mod targets;
mod tools;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use contextos_runner::{
    keys::{KeyPair, PublicKey},
    records::{AnyStore, StoreLocation, TenantId},
};

/// Run AI agents with replayable decisions.
#[derive(Debug, Parser)]
#[command(name = "contextos", version)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand understands.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Directory holding the embedded record store and the local signing key.
    #[arg(long, global = true, env = "CONTEXTOS_DATA_DIR", default_value = ".contextos")]
    pub(crate) data_dir: PathBuf,
    /// Tenant (Kubernetes namespace) whose records to use.
    #[arg(long, global = true, env = "CONTEXTOS_TENANT", default_value = "default")]
    tenant: String,
    /// Record store: `tikv://<pd host:port>[,…]` or `embedded:<file>`; default: the data dir's store.
    #[arg(long, global = true, env = "CONTEXTOS_STORE")]
    store: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a Session from manifest files: governed, recorded, resumable.
    Run(run::RunArgs),
    /// Continue a Session's run from its latest checkpoint (after a crash or an approval).
    Resume(run::ResumeArgs),
    /// Approve (or reject) the call a Session's run waits on.
    Approve(run::ApproveArgs),
    /// Say whether a call whose outcome was unknown acted, so the Session's run can go on.
    Resolve(run::ResolveArgs),
    /// Re-run recorded sessions under the same or candidate Policy/ContextPack files and report
    /// every divergence; exits 3 above the threshold.
    Replay(replay::ReplayArgs),
    /// Replay Job entrypoint: have the gateway service replay the candidate its read grant
    /// orders and write the signed verdict; exits 0 passed, 3 failed, 4 nothing to replay.
    ReplayGate(replay::GateArgs),
    /// Runner pod entrypoint: run or resume the Session the operator mounted into the pod.
    SessionRun(session_run::SessionRunArgs),
    /// Where a ContextPack or Policy revision stands on its replay gate (reads the cluster).
    #[command(subcommand)]
    Promote(promote::PromoteCommand),
    /// Inspect, verify and export DecisionRecords.
    #[command(subcommand)]
    Records(records::RecordsCommand),
    /// Serve the Tool Gateway over HTTP for runner pods.
    Gateway(gateway::GatewayArgs),
    /// Capability pod entrypoint: serve an Agent's command-started MCP server to the gateway.
    #[command(subcommand)]
    Capability(capability::CapabilityCommand),
    /// Audit an agent harness (manifest files, a GitOps repository, or the live cluster) for
    /// governance gaps: each finding with its rule, severity, object, field, line and fix.
    Audit(audit::AuditArgs),
    /// Corrections of runs: give one (a label, what should have happened, the entry it is
    /// about), list them (verified).
    #[command(subcommand)]
    Feedback(feedback::FeedbackCommand),
    /// What the records of a window show: signals per agent, tool, rule and source, and the
    /// recurring patterns among them (insights), each with the runs it rests on.
    Insights(insights::InsightsArgs),
    /// Typed Proposals drafted from the insights of a window (corrections, denials, approvals,
    /// dryRun rules, cut sources) against the current Agents, Policies and ContextPacks;
    /// printed as YAML to apply. Nothing is applied until a reviewer accepts one.
    Propose(propose::ProposeArgs),
    /// The tightest run-budget limit (tokens, steps, tool calls) an Agent's recorded runs
    /// replay under with no new divergence, measured by replays and proposed with headroom; or
    /// a value you name, refused if it would change a recorded run.
    Autotune(autotune::AutotuneArgs),
    /// The digest of a window for the people who review: what the agents did, what failed and
    /// why, what recurs, proposals with their replay verdicts, what was promoted (text, JSON or
    /// one self-contained HTML page).
    Digest(digest::DigestArgs),
    /// Spend over a window, from the records: model tokens, priced tool calls and their cost
    /// (at the prices the runs pinned from the cluster's PriceLists) by agent, model, tool or a
    /// Session label such as team.
    Cost(cost::CostArgs),
    /// Tool declarations from what a tool server offers.
    #[command(subcommand)]
    Tools(tools::ToolsCommand),
    /// Consent records of a tenant's subjects: grant, revoke (appended, never edited), list,
    /// show with what is in force.
    #[command(subcommand)]
    Consent(consent::ConsentCommand),
    /// Memory items of a tenant: list a scope's, forget one or a whole scope (a subject's).
    #[command(subcommand)]
    Memory(memory::MemoryCommand),
    /// People in the identity vault: erase one (their data becomes unreadable everywhere, the
    /// records still verify), see whether one is, rotate the tenant's key-encryption key.
    #[command(subcommand)]
    Subject(subject::SubjectCommand),
    /// Skills: run their evaluation suites here, as their promotion gate does in a cluster.
    #[command(subcommand)]
    Skill(skill::SkillCommand),
}

impl Cli {
    /// The name this process's spans are exported under: the gateway service and a runner pod
    /// are services of their own; every other command is the `contextos` CLI.
    pub fn service_name(&self) -> &'static str {
        match self.command {
            Command::Gateway(_) => "contextos-gateway",
            Command::SessionRun(_) => "contextos-runner",
            _ => "contextos",
        }
    }

    /// What a runner pod presents to the gateway with its spans (it exports them nowhere else).
    pub fn trace_relay(&self) -> Option<contextos_runner::telemetry::RelayCredentials> {
        match &self.command {
            Command::SessionRun(args) => args.trace_relay(),
            _ => None,
        }
    }

    pub async fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(args) => run::run(&self.global, args).await,
            Command::Resume(args) => run::resume(&self.global, args).await,
            Command::Approve(args) => run::approve(&self.global, args).await,
            Command::Resolve(args) => run::resolve(&self.global, args).await,
            Command::Replay(args) => replay::run(&self.global, args).await,
            Command::ReplayGate(args) => replay::gate(&self.global, args).await,
            Command::SessionRun(args) => session_run::run(args).await,
            Command::Promote(command) => promote::run(command).await,
            Command::Records(command) => records::run(&self.global, command).await,
            Command::Gateway(args) => gateway::run(&self.global, args).await,
            Command::Capability(command) => capability::run(command).await,
            Command::Audit(args) => audit::run(&self.global, args).await,
            Command::Feedback(command) => feedback::run(&self.global, command).await,
            Command::Insights(args) => insights::run(&self.global, args).await,
            Command::Propose(args) => propose::run(&self.global, args).await,
            Command::Autotune(args) => autotune::run(&self.global, args).await,
            Command::Digest(args) => digest::run(&self.global, args).await,
            Command::Cost(args) => cost::run(&self.global, args).await,
            Command::Tools(command) => tools::run(command).await,
            Command::Consent(command) => consent::run(&self.global, command).await,
            Command::Memory(command) => memory::run(&self.global, command).await,
            Command::Subject(command) => subject::run(&self.global, command).await,
            Command::Skill(command) => skill::run(command).await,
        }
    }
}

/// A span of time written as a number and a unit (`90s`, `10m`, `12h`, `7d`), as `flag` takes it.
/// A time in milliseconds since the epoch, as UTC (`2026-12-03T16:02:15Z`).
fn format_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(
        |_| format!("{ms} ms"),
        |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

fn parse_span(flag: &str, text: &str) -> anyhow::Result<std::time::Duration> {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number
        .parse()
        .with_context(|| format!("{flag} {text:?}: expected a number and a unit, e.g. 90s, 10m, 12h, 7d"))?;
    let seconds = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3_600),
        "d" => n.checked_mul(86_400),
        _ => anyhow::bail!("{flag} {text:?}: the unit must be s, m, h or d"),
    };
    let seconds = seconds
        .filter(|s| *s <= 100 * 365 * 86_400)
        .with_context(|| format!("{flag} {text:?}: more than a hundred years"))?;
    Ok(std::time::Duration::from_secs(seconds))
}

impl GlobalArgs {
    fn tenant(&self) -> anyhow::Result<TenantId> {
        TenantId::new(&self.tenant).with_context(|| format!("--tenant {:?}", self.tenant))
    }

    fn store_location(&self) -> anyhow::Result<StoreLocation> {
        match &self.store {
            Some(url) => StoreLocation::parse(url).with_context(|| format!("--store {url:?}")),
            None => Ok(StoreLocation::in_data_dir(&self.data_dir)),
        }
    }

    async fn open_store(&self) -> anyhow::Result<AnyStore> {
        let location = self.store_location()?;
        AnyStore::open(&location)
            .await
            .with_context(|| format!("opening the record store {location:?}"))
    }

    /// The store for reading `tenant`'s records (through the gateway: with the reader's own
    /// token, see [`AnyStore::open_for`]).
    async fn open_records(&self, tenant: &TenantId) -> anyhow::Result<AnyStore> {
        let location = self.store_location()?;
        AnyStore::open_for(&location, tenant)
            .await
            .with_context(|| format!("opening the record store {location:?}"))
    }

    /// Who a person at this terminal is, for what a local store records in their name
    /// (`local:<login>`); a gateway takes it from their token instead.
    fn local_user() -> String {
        format!(
            "local:{}",
            std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| "unknown".into())
        )
    }

    fn key_path(&self) -> PathBuf {
        self.data_dir.join("keys").join("signing.key")
    }

    /// The key record heads are verified with: `explicit` hex, else the data dir's key.
    fn verifying_key(&self, explicit: Option<&str>) -> anyhow::Result<PublicKey> {
        match explicit {
            Some(hex) => Ok(PublicKey::from_hex(hex)?),
            None => {
                let path = self.key_path();
                let text = std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no verifying key: {} does not exist; pass --public-key <hex> (the public key of the signer; \
                         in a cluster the gateway publishes each namespace's at /v1/tenants/<namespace>/record-key)",
                        path.display()
                    )
                })?;
                let key = KeyPair::from_hex(&text)
                    .with_context(|| format!("{} is not an ed25519 key file", path.display()))?;
                Ok(key.public())
            }
        }
    }
}
