//! `contextos propose`: the insights of a window (as `contextos insights` finds them, people's
//! corrections included) compiled into typed Proposal objects against the current specs of the
//! Agents, Policies and ContextPacks they are about — read from files or the live cluster.
//! Proposals are printed as YAML for `kubectl apply -f -` (or a Git commit); nothing is
//! applied here, and nothing a proposal names changes until a reviewer accepts it. Insights no
//! rule turns into a patch, and the research queue, are said on stderr.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use contextos_crds::{Agent, AgentSpec, ContextPack, ContextPackSpec, Policy, PolicySpec};
use contextos_runner::{
    insights::{self, Insight, Thresholds, open_questions, signals::CallSample, synthesize},
    manifests::ManifestSet,
    proposals::{Compiled, World, compile},
    records::{RunFilter, recorder::now_ms},
};
use kube::{Api, api::ListParams};
use serde::de::DeserializeOwned;

use super::{GlobalArgs, insights::corrections};

#[derive(Debug, clap::Args)]
pub struct ProposeArgs {
    /// Files or directories holding the Agents, Policies and ContextPacks the insights are
    /// about (a GitOps checkout). Default: the live cluster of the current kubeconfig, in the
    /// tenant's namespace.
    paths: Vec<PathBuf>,
    /// The window: runs started this long ago or later (e.g. 24h, 7d).
    #[arg(long, default_value = "7d")]
    since: String,
    /// Only this agent's runs.
    #[arg(long)]
    agent: Option<String>,
    /// Runs a pattern must be seen in to be an insight.
    #[arg(long, default_value_t = 2)]
    min_runs: u64,
    /// Approvals under a rule before "always granted" or "always refused" counts.
    #[arg(long, default_value_t = 3)]
    min_approvals: u64,
}

/// The specs proposals are drafted against, by name.
#[derive(Default)]
struct Specs {
    agents: BTreeMap<String, AgentSpec>,
    policies: BTreeMap<String, PolicySpec>,
    packs: BTreeMap<String, ContextPackSpec>,
}

impl Specs {
    fn from_files(paths: &[PathBuf]) -> anyhow::Result<Self> {
        let set = ManifestSet::load(paths)?;
        let mut specs = Self::default();
        for object in &set.objects {
            let spec = || object.value.get("spec").cloned().unwrap_or_default();
            let at = || format!("{}: {} {}", object.file.display(), object.kind, object.name);
            match object.kind.as_str() {
                "Agent" => {
                    specs.agents.insert(
                        object.name.clone(),
                        serde_json::from_value(spec()).with_context(at)?,
                    );
                }
                "Policy" => {
                    specs.policies.insert(
                        object.name.clone(),
                        serde_json::from_value(spec()).with_context(at)?,
                    );
                }
                "ContextPack" => {
                    specs.packs.insert(
                        object.name.clone(),
                        serde_json::from_value(spec()).with_context(at)?,
                    );
                }
                _ => {}
            }
        }
        Ok(specs)
    }

    async fn from_cluster(namespace: &str) -> anyhow::Result<Self> {
        let client = kube::Client::try_default()
            .await
            .context("cannot reach the cluster of the current kubeconfig (KUBECONFIG, ~/.kube/config); or name the manifest files")?;
        async fn specs<K, T>(
            client: &kube::Client,
            namespace: &str,
            spec: fn(K) -> T,
        ) -> anyhow::Result<BTreeMap<String, T>>
        where
            K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
                + Clone
                + DeserializeOwned
                + std::fmt::Debug,
        {
            let kind = K::kind(&()).into_owned();
            Ok(Api::<K>::namespaced(client.clone(), namespace)
                .list(&ListParams::default())
                .await
                .with_context(|| format!("cannot list {kind} objects in namespace {namespace}"))?
                .items
                .into_iter()
                .map(|o| (o.meta().name.clone().unwrap_or_default(), spec(o)))
                .collect())
        }
        Ok(Self {
            agents: specs(&client, namespace, |a: Agent| a.spec).await?,
            policies: specs(&client, namespace, |p: Policy| p.spec).await?,
            packs: specs(&client, namespace, |p: ContextPack| p.spec).await?,
        })
    }

    /// What `agent` runs with, or why it cannot be said.
    fn world<'a>(&'a self, agent: &'a str) -> Result<World<'a>, String> {
        let spec = self
            .agents
            .get(agent)
            .ok_or_else(|| format!("Agent {agent} is not among the objects read"))?;
        let pack_name = &spec.context_pack_ref.name;
        let pack = self.packs.get(pack_name).ok_or_else(|| {
            format!("ContextPack {pack_name} of Agent {agent} is not among the objects read")
        })?;
        let policies = spec
            .policy_refs
            .iter()
            .map(|r| {
                self.policies
                    .get(&r.name)
                    .map(|p| (r.name.as_str(), p))
                    .ok_or_else(|| {
                        format!("Policy {} of Agent {agent} is not among the objects read", r.name)
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(World {
            agent,
            agent_spec: spec,
            pack: (pack_name, pack),
            policies,
        })
    }
}

pub async fn run(global: &GlobalArgs, args: ProposeArgs) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let specs = if args.paths.is_empty() {
        Specs::from_cluster(tenant.as_str()).await?
    } else {
        Specs::from_files(&args.paths)?
    };
    let store = global.open_records(&tenant).await?;
    let window = super::parse_span("--since", &args.since)?;
    let since_ms = now_ms().saturating_sub(i64::try_from(window.as_millis()).unwrap_or(i64::MAX));
    let filter = RunFilter {
        agent: args.agent.clone(),
        since_ms: Some(since_ms),
        ..RunFilter::default()
    };
    let key = match &store {
        contextos_runner::records::AnyStore::Gateway(_) => None,
        _ => global.verifying_key(None).ok(),
    };
    let corrections = corrections(&store, &tenant, key.as_ref());
    let gathered = insights::gather(&store, &tenant, &filter, &corrections)
        .await
        .with_context(|| format!("reading the records of tenant {tenant}"))?;
    let thresholds = Thresholds {
        min_runs: args.min_runs,
        min_approvals: args.min_approvals,
    };
    let mut drafted = 0;
    for insight in synthesize(&gathered.signals, thresholds) {
        let compiled = match specs.world(&insight.agent) {
            Ok(world) => compile(&insight, &world, &samples(&gathered.signals, &insight)),
            Err(why) => Compiled::Open(why),
        };
        match compiled {
            Compiled::Draft(draft) => {
                let manifest = draft.manifest(tenant.as_str());
                print!("---\n{}", serde_yaml::to_string(&manifest)?);
                eprintln!(
                    "proposed {}: {} ({})",
                    draft.name(),
                    insight.summary,
                    insight.kind.as_str()
                );
                drafted += 1;
            }
            Compiled::Open(why) => eprintln!(
                "not proposed: {} ({}): {why}",
                insight.summary,
                insight.kind.as_str()
            ),
        }
    }
    eprint!(
        "{}",
        super::insights::research(&open_questions(&gathered.signals, thresholds))
    );
    eprintln!(
        "{drafted} proposal(s) from {} run(s) of tenant {tenant} in the last {}",
        gathered.runs, args.since
    );
    Ok(ExitCode::SUCCESS)
}

/// The calls of the insight's tool, by every agent: a rule in a shared policy decides them all.
fn samples(signals: &insights::Signals, insight: &Insight) -> Vec<CallSample> {
    signals
        .agents
        .values()
        .filter_map(|a| a.tools.get(&insight.about))
        .flat_map(|t| t.samples.iter().cloned())
        .collect()
}
