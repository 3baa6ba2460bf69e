//! `contextos audit`: read manifests (files, directories, or a live cluster), run every audit
//! rule, print the report; with `--fail-on` the exit code gates CI.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use contextos_crds::{Agent, ContextPack, Ontology, Policy, SandboxProfile, Session};
use contextos_runner::audit::{
    self, Harness, Severity, evidence, report::rules_markdown, rules::install::DELIBERATE_ROLES, source,
};
use contextos_runner::text::{for_terminal, for_terminal_keeping_lines};
use k8s_openapi::{
    api::{
        admissionregistration::v1::{ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding},
        apps::v1::Deployment,
        core::v1::Namespace,
        rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Resource, api::ListParams};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::GlobalArgs;

/// Exit code when a finding at or above `--fail-on` was made.
pub const EXIT_FINDINGS: u8 = 3;
/// Namespace of the ContextOS installation (operator and gateway Deployments).
const SYSTEM_NAMESPACE: &str = "contextos-system";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Text,
    Json,
    Sarif,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Manifest files or directories (walked recursively: a GitOps repository, `kustomize build`
    /// or `helm template` output). Default: the current directory, unless --cluster.
    paths: Vec<PathBuf>,
    /// More manifest files or directories.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Audit the live cluster of the current kubeconfig instead of files.
    #[arg(long, conflicts_with_all = ["paths", "files"])]
    cluster: bool,
    /// With --cluster: only this namespace's ContextOS objects (default: the kubeconfig's).
    #[arg(short = 'n', long, requires = "cluster")]
    namespace: Option<String>,
    /// With --cluster: every namespace.
    #[arg(short = 'A', long, requires = "cluster", conflicts_with = "namespace")]
    all_namespaces: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Exit 3 when a finding of this severity or above is made (for CI).
    #[arg(long, value_enum)]
    fail_on: Option<Severity>,
    /// Also audit what the records show the agents did (the data dir's store, or --store; the
    /// runs of --tenant, which the records rules judge that namespace's objects by).
    #[arg(long)]
    records: bool,
    /// With --records: the window, back from now (`30m`, `24h`, `7d`).
    #[arg(long, default_value = "7d", requires = "records", value_parser = parse_window)]
    since: std::time::Duration,
    /// Also compare what this streamable-HTTP MCP server lists with the Agents that use it
    /// (repeatable).
    #[arg(long = "mcp", visible_alias = "mcp-url", value_name = "URL")]
    mcp_urls: Vec<String>,
    /// Also compare what this stdio MCP server lists (the command and its arguments as one
    /// string, started here with a clean environment) with the Agents that use it (repeatable).
    #[arg(long = "mcp-command", value_name = "COMMAND")]
    mcp_commands: Vec<String>,
    /// Also compare Agents' HTTP tools with this OpenAPI 3 document (a file or an http(s) URL;
    /// repeatable), for the tools whose URL is under its `servers[0].url`.
    #[arg(long = "openapi", value_name = "FILE|URL")]
    openapi: Vec<String>,
    /// Print the rule table (Markdown) instead of auditing.
    #[arg(long)]
    rules: bool,
}

/// `30m`, `24h`, `7d` as a duration.
fn parse_window(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let count: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a window like 30m, 24h or 7d"))?;
    let seconds = match unit {
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is m, h or d (30m, 24h, 7d)")),
    };
    Ok(std::time::Duration::from_secs(count.saturating_mul(seconds)))
}

pub async fn run(global: &GlobalArgs, args: AuditArgs) -> anyhow::Result<ExitCode> {
    if args.rules {
        print!("{}", rules_markdown());
        return Ok(ExitCode::SUCCESS);
    }
    let harness = if args.cluster {
        read_cluster(args.namespace.as_deref(), args.all_namespaces).await?
    } else {
        let mut paths = args.paths.clone();
        paths.extend(args.files.iter().cloned());
        if paths.is_empty() {
            paths.push(PathBuf::from("."));
        }
        let harness = Harness::from_documents(source::load(&paths)?, false);
        if !harness.has_contextos_objects() && !harness.has_installation() {
            // A CI job pointed at the wrong directory must not pass as "no findings".
            let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            anyhow::bail!(
                "no ContextOS object ({}) and no ContextOS installation in {}: nothing to audit",
                audit::harness::API_VERSION,
                shown.join(", ")
            );
        }
        harness
    };
    let harness = if args.records {
        // With --cluster -n, the records are that namespace's.
        let tenant = match (&args.namespace, args.cluster) {
            (Some(namespace), true) => contextos_runner::records::TenantId::new(namespace)?,
            _ => global.tenant()?,
        };
        let store = global.open_records(&tenant).await?;
        let now_ms = jiff::Timestamp::now().as_millisecond();
        let since_ms = now_ms.saturating_sub(i64::try_from(args.since.as_millis()).unwrap_or(i64::MAX));
        let evidence = evidence::gather(&store, &tenant, since_ms)
            .await
            .with_context(|| format!("reading the records of tenant {tenant}"))?;
        for (run, why) in &evidence.unreadable {
            eprintln!(
                "contextos audit: run {} left out: {}",
                for_terminal(run),
                for_terminal(&why.to_string())
            );
        }
        if evidence.truncated {
            eprintln!(
                "contextos audit: the window holds more than {} runs; the newest were read (narrow --since)",
                evidence::MAX_RUNS
            );
        }
        harness.with_evidence(evidence)
    } else {
        harness
    };
    let mut harness = harness;
    let servers = args
        .mcp_urls
        .iter()
        .map(|url| super::tools::adapter(Some(url), None))
        .chain(
            args.mcp_commands
                .iter()
                .map(|command| super::tools::adapter(None, Some(command))),
        );
    for adapter in servers {
        let adapter = adapter?;
        let listing = audit::live::introspect(adapter.clone()).await.with_context(|| {
            "listing the tools of an MCP server given with --mcp/--mcp-command".to_owned()
        })?;
        harness.live.push(listing);
    }
    for source in &args.openapi {
        harness.apis.push(super::tools::read_openapi(source, None).await?);
    }
    let report = audit::audit(&harness);
    match args.format {
        Format::Text => print!("{}", for_terminal_keeping_lines(&report.text())),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report.json())?),
        Format::Sarif => println!("{}", serde_json::to_string_pretty(&report.sarif())?),
    }
    Ok(match args.fail_on {
        Some(threshold) if report.fails(threshold) => ExitCode::from(EXIT_FINDINGS),
        _ => ExitCode::SUCCESS,
    })
}

/// The ContextOS objects of the namespace (or all), the Namespaces they live in, the admission
/// policies and bindings, the CRDs, the installation's Deployments, and the roles and bindings
/// of the rights granted on purpose.
async fn read_cluster(namespace: Option<&str>, all: bool) -> anyhow::Result<Harness> {
    let client = kube::Client::try_default()
        .await
        .context("cannot reach the cluster of the current kubeconfig (KUBECONFIG, ~/.kube/config)")?;
    let namespace = namespace.unwrap_or(client.default_namespace()).to_owned();
    let scope = (!all).then_some(namespace.as_str());
    let mut values = Vec::new();
    values.extend(list(scoped::<Agent>(&client, scope)).await?);
    values.extend(list(scoped::<Policy>(&client, scope)).await?);
    values.extend(list(scoped::<ContextPack>(&client, scope)).await?);
    values.extend(list(scoped::<SandboxProfile>(&client, scope)).await?);
    values.extend(list(scoped::<Session>(&client, scope)).await?);
    // What the Agents' skills bring (their tools are audited with each Agent using them).
    values.extend(list(scoped::<contextos_crds::Skill>(&client, scope)).await?);
    // What the Agents' entity types are checked against.
    values.extend(list(scoped::<Ontology>(&client, scope)).await?);
    // What the Agents' models are priced by (cluster-scoped).
    values.extend(list(Api::<contextos_crds::PriceList>::all(client.clone())).await?);
    values.extend(list(Api::<Namespace>::all(client.clone())).await?);
    values.extend(list(Api::<ValidatingAdmissionPolicy>::all(client.clone())).await?);
    values.extend(list(Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())).await?);
    values.extend(
        list(Api::<CustomResourceDefinition>::all(client.clone()))
            .await?
            .into_iter()
            .filter(|crd| {
                crd["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(".contextos.dev"))
            }),
    );
    values.extend(list(Api::<Deployment>::namespaced(client.clone(), SYSTEM_NAMESPACE)).await?);
    // The bindings and roles of the rights ContextOS leaves to be granted on purpose.
    let deliberate = |value: &Value, path: &str| {
        value
            .pointer(path)
            .and_then(Value::as_str)
            .is_some_and(|name| DELIBERATE_ROLES.iter().any(|(role, _)| name.contains(role)))
    };
    values.extend(
        list(scoped::<RoleBinding>(&client, scope))
            .await?
            .into_iter()
            .filter(|b| deliberate(b, "/roleRef/name")),
    );
    values.extend(
        list(Api::<ClusterRoleBinding>::all(client.clone()))
            .await?
            .into_iter()
            .filter(|b| deliberate(b, "/roleRef/name")),
    );
    values.extend(
        list(Api::<ClusterRole>::all(client.clone()))
            .await?
            .into_iter()
            .filter(|r| deliberate(r, "/metadata/name")),
    );
    let documents = values.into_iter().map(source::Document::unplaced).collect();
    Ok(Harness::from_documents(documents, true))
}

/// The objects of a namespaced kind in `namespace`, or in every namespace.
fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Every object `api` lists, as JSON without managedFields.
async fn list<K>(api: Api<K>) -> anyhow::Result<Vec<Value>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let kind = K::kind(&());
    let listed = api
        .list(&ListParams::default())
        .await
        .with_context(|| format!("cannot list {kind} objects"))?;
    listed
        .items
        .into_iter()
        .map(|item| {
            let mut value = serde_json::to_value(item)?;
            if let Some(meta) = value["metadata"].as_object_mut() {
                meta.remove("managedFields");
            }
            // Typed lists leave apiVersion/kind to the list; the audit sorts by them.
            value["apiVersion"] = Value::String(K::api_version(&()).into_owned());
            value["kind"] = Value::String(kind.clone().into_owned());
            Ok(value)
        })
        .collect()
}
