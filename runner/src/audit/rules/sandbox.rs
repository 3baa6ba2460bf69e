//! Rules about SandboxProfiles: how far their pods may reach, what they may write, how long they
//! live, which code they may run, under which runtime, from which image.

use contextos_crds::common::ToolRisk;

use super::{Check, Sink, spec};
use crate::{
    audit::finding::{Rule, RuleId, Severity},
    audit::harness::Harness,
    run::execution::executes_code,
};

/// A prefix this short is "the internet" or a whole private range: an IPv4 /8, an IPv6 /32 (a
/// whole provider's allocation).
const WIDE_PREFIX_V4: u8 = 8;
const WIDE_PREFIX_V6: u8 = 32;
/// Longer than a day is not a sandbox's deadline any more.
const LONG_DEADLINE_SECONDS: u32 = 86_400;
/// The image the operator's runner pods must run (the admission policy enforces it).
const RUNNER_IMAGE_PREFIXES: [&str; 2] = ["ghcr.io/contextos/runner:", "ghcr.io/contextos/runner@"];

pub(super) const RULES: &[(Rule, Check)] = &[
    (
        Rule {
            id: RuleId("sandbox/wide-egress"),
            severity: Severity::High,
            title: "a SandboxProfile letting code reach a whole network range",
            why: "code run for an Agent's tools can reach anything in a /8 or wider (0.0.0.0/0 is the internet): exfiltration and lateral movement",
            fix: "allow only the addresses the tools need (a /32 or a small range) in `spec.egress`",
        },
        wide_egress,
    ),
    (
        Rule {
            id: RuleId("sandbox/egress-every-port"),
            severity: Severity::Medium,
            title: "an egress rule without ports",
            why: "a rule with no ports allows every port of those addresses, not just the service the tool uses",
            fix: "list the ports in `spec.egress[].ports`",
        },
        egress_every_port,
    ),
    (
        Rule {
            id: RuleId("sandbox/writable-root"),
            severity: Severity::High,
            title: "a SandboxProfile with a writable root filesystem",
            why: "code in the pod can replace the runner's own binaries and libraries and persist changes between tool calls",
            fix: "set `spec.readOnlyRootFilesystem: true` (the default); pods get scratch space under /tmp",
        },
        writable_root,
    ),
    (
        Rule {
            id: RuleId("sandbox/long-deadline"),
            severity: Severity::Medium,
            title: "a sandbox deadline longer than a day",
            why: "a stuck or hijacked run keeps its pod, and whatever it holds, for days",
            fix: "lower `spec.activeDeadlineSeconds` (default 3600)",
        },
        long_deadline,
    ),
    (
        Rule {
            id: RuleId("sandbox/executes-anything"),
            severity: Severity::High,
            title: "a SandboxProfile letting every tool execute code at network risk or above",
            why: "`allowedTools: [\"*\"]` with a high `maxRisk` means any stdio MCP server an Agent names runs, with egress",
            fix: "list the tools that may execute code in `spec.execution.allowedTools`, and keep `maxRisk` at local_write",
        },
        executes_anything,
    ),
    (
        Rule {
            id: RuleId("sandbox/code-without-runtime-class"),
            severity: Severity::Low,
            title: "code execution without a stronger runtime",
            why: "an Agent's stdio MCP servers run in capability pods under the default runtime (runc: the host kernel), not gVisor or Kata",
            fix: "set `spec.runtimeClassName` to a sandboxed runtime class where the cluster has one",
        },
        code_without_runtime_class,
    ),
    (
        Rule {
            id: RuleId("sandbox/image-not-runner"),
            severity: Severity::High,
            title: "a SandboxProfile image that is not the ContextOS runner",
            why: "runner pods must run the ContextOS runner; the admission policy `contextos-sandbox-images` refuses other images",
            fix: "pin `ghcr.io/contextos/runner:<version>@sha256:<digest>`",
        },
        image_not_runner,
    ),
];

/// Whether `cidr` spans a whole range (see [`WIDE_PREFIX_V4`]).
fn is_wide(cidr: &str) -> bool {
    match cidr.parse::<ipnet::IpNet>() {
        Ok(ipnet::IpNet::V4(net)) => net.prefix_len() <= WIDE_PREFIX_V4,
        Ok(ipnet::IpNet::V6(net)) => net.prefix_len() <= WIDE_PREFIX_V6,
        Err(_) => false,
    }
}

/// Whether a tool-name glob matches every name (`*`, `**`, `?*`, …).
fn matches_everything(glob: &str) -> bool {
    glob.contains('*')
        && glob.chars().all(|c| c == '*' || c == '?')
        && glob.chars().filter(|c| *c == '?').count() <= 1
}

fn wide_egress(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in &harness.sandbox_profiles {
        for (i, rule) in profile.spec.egress.iter().enumerate() {
            if is_wide(&rule.cidr) {
                sink.report(
                    profile,
                    spec(&["egress"]).index(i).key("cidr"),
                    format!("{} reaches a whole range", rule.cidr),
                );
            }
        }
    }
}

fn egress_every_port(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in &harness.sandbox_profiles {
        for (i, rule) in profile
            .spec
            .egress
            .iter()
            .enumerate()
            .filter(|(_, r)| r.ports.is_empty())
        {
            sink.report(
                profile,
                spec(&["egress"]).index(i),
                format!("every port of {} is allowed", rule.cidr),
            );
        }
    }
}

fn writable_root(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in harness
        .sandbox_profiles
        .iter()
        .filter(|p| !p.spec.read_only_root_filesystem)
    {
        sink.report(
            profile,
            spec(&["readOnlyRootFilesystem"]),
            "the root filesystem is writable",
        );
    }
}

fn long_deadline(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in &harness.sandbox_profiles {
        let deadline = profile.spec.active_deadline_seconds;
        if deadline > LONG_DEADLINE_SECONDS {
            sink.report(
                profile,
                spec(&["activeDeadlineSeconds"]),
                format!("pods may live {deadline} s"),
            );
        }
    }
}

fn executes_anything(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in &harness.sandbox_profiles {
        let execution = &profile.spec.execution;
        if execution.allowed_tools.iter().any(|g| matches_everything(g))
            && execution.max_risk >= ToolRisk::Network
        {
            sink.report(
                profile,
                spec(&["execution"]),
                format!(
                    "every tool up to {} may execute code",
                    execution.max_risk.as_str()
                ),
            );
        }
    }
}

fn code_without_runtime_class(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in harness
        .sandbox_profiles
        .iter()
        .filter(|p| p.spec.runtime_class_name.is_none())
    {
        let runs_code = harness.agents.iter().find(|a| {
            a.same_namespace(profile)
                && a.spec.sandbox_profile_ref.name == profile.id.name
                && a.spec.tools.iter().any(executes_code)
        });
        if let Some(agent) = runs_code {
            sink.report(
                profile,
                spec(&["runtimeClassName"]),
                format!(
                    "Agent {} executes code under this profile with the default runtime",
                    agent.id.name
                ),
            );
        }
    }
}

fn image_not_runner(harness: &Harness, sink: &mut Sink<'_>) {
    for profile in &harness.sandbox_profiles {
        let image = &profile.spec.image;
        if !RUNNER_IMAGE_PREFIXES.iter().any(|p| image.starts_with(p)) {
            sink.report(
                profile,
                spec(&["image"]),
                format!("{image} is not ghcr.io/contextos/runner"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_ranges_and_match_all_globs_are_recognised() {
        assert!(is_wide("0.0.0.0/0") && is_wide("10.0.0.0/8") && is_wide("2001:db8::/32") && is_wide("::/0"));
        assert!(!is_wide("10.96.0.0/12") && !is_wide("2001:db8::/48") && !is_wide("not a cidr"));
        assert!(matches_everything("*") && matches_everything("**") && matches_everything("?*"));
        assert!(!matches_everything("lint_*") && !matches_everything("??*") && !matches_everything("?"));
    }
}
