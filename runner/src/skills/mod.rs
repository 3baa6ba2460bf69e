//! Skills (pure): what an Agent that lists skills in `spec.skillRefs` runs — its own tools, then
//! each skill's, and each skill's prompt fragments as context sources — and the conflicts that
//! keep it from running: one tool name declared twice, a tool riskier than its SandboxProfile
//! allows. The operator and `contextos run` compose alike; the evaluation suite a revision
//! passes before it is promoted is in [`eval`].

pub mod eval;

use contextos_crds::{
    AgentSpec, SkillSpec,
    agent::Tool,
    common::ToolRisk,
    conditions::reason,
    context_pack::{ContextPackSpec, ContextSource},
    skill::PromptFragment,
};
use serde::{Deserialize, Serialize};

use crate::{gateway::bundle::NamedPolicy, run::bundle::spec_digest};

/// A skill at one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedSkill {
    pub name: String,
    /// The digest of its spec (what a run pins; a promotion candidate is identified by
    /// [`SkillCandidate::digest`], which covers the suite's Policies too).
    pub digest: String,
    pub spec: SkillSpec,
}

/// What a Skill's promotion gate evaluates, and its revision identity: the spec with the
/// promoted revisions of the policies its suite runs under (a stricter policy is a new
/// candidate, evaluated again).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillCandidate {
    pub skill: SkillSpec,
    /// In `spec.evals.policyRefs` order.
    pub policies: Vec<NamedPolicy>,
}

impl SkillCandidate {
    pub fn digest(&self) -> String {
        spec_digest(self)
    }
}

/// A skill as a run uses it: which revision, which of the run's tools are its, and its
/// fragments (recorded with the run's bundle, so a replay compiles the same context).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SkillUse {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fragments: Vec<PromptFragment>,
}

impl SkillUse {
    /// The context source a fragment is compiled as (`skill.<skill>.<fragment>`).
    pub fn source_name(skill: &str, fragment: &str) -> String {
        format!("skill.{skill}.{fragment}")
    }
}

/// The SandboxProfile an Agent runs under, as far as its tools are concerned.
#[derive(Clone, Copy, Debug)]
pub struct ToolCeiling<'a> {
    pub profile: &'a str,
    pub max_risk: Option<ToolRisk>,
}

/// Why an Agent cannot run with its skills.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Conflict {
    /// `SkillConflict`, or `InvalidSpec` for the Agent's own tool above the ceiling.
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// The Agent's tools with its skills' (own first, then each skill's in `skillRefs` order) and
/// how the run uses each skill, or the first conflict.
pub fn compose(
    agent: &AgentSpec,
    skills: &[NamedSkill],
    ceiling: ToolCeiling<'_>,
) -> Result<(Vec<Tool>, Vec<SkillUse>), Conflict> {
    let too_risky = |tool: &Tool| ceiling.max_risk.filter(|max| tool.risk > *max);
    for (i, tool) in agent.tools.iter().enumerate() {
        if let Some((part, problem)) = tool_problem(tool) {
            return Err(Conflict {
                reason: reason::INVALID_SPEC,
                field: format!("spec.tools[{i}].{part}"),
                message: problem,
            });
        }
        if let Some(max) = too_risky(tool) {
            return Err(Conflict {
                reason: reason::INVALID_SPEC,
                field: format!("spec.tools[{i}]"),
                message: format!(
                    "tool {} has risk {}, above SandboxProfile {}'s maxToolRisk {}; lower its risk or run the Agent under a profile that allows it",
                    tool.name,
                    tool.risk.as_str(),
                    ceiling.profile,
                    max.as_str()
                ),
            });
        }
    }
    // Who declared each name so far, as a conflict names it.
    let mut owners: Vec<(&str, String)> = agent
        .tools
        .iter()
        .map(|t| (t.name.as_str(), "the Agent's spec.tools".to_owned()))
        .collect();
    let mut tools = agent.tools.clone();
    let mut uses = Vec::with_capacity(skills.len());
    for (i, skill) in skills.iter().enumerate() {
        let field = format!("spec.skillRefs[{i}]");
        let label = format!("Skill {} (version {})", skill.name, skill.spec.version);
        for tool in &skill.spec.tools {
            if let Some((_, problem)) = tool_problem(tool) {
                return Err(Conflict {
                    reason: reason::SKILL_CONFLICT,
                    field,
                    message: format!("{label}: {problem}"),
                });
            }
            if let Some((_, owner)) = owners.iter().find(|(name, _)| *name == tool.name) {
                return Err(Conflict {
                    reason: reason::SKILL_CONFLICT,
                    field,
                    message: format!(
                        "{label} declares tool {}, which {owner} declares too; a run can call only one tool of a name: rename one, or drop one of them",
                        tool.name
                    ),
                });
            }
            if let Some(max) = too_risky(tool) {
                return Err(Conflict {
                    reason: reason::SKILL_CONFLICT,
                    field,
                    message: format!(
                        "{label} declares tool {} with risk {}, above SandboxProfile {}'s maxToolRisk {}; drop the skill, or run the Agent under a profile that allows it",
                        tool.name,
                        tool.risk.as_str(),
                        ceiling.profile,
                        max.as_str()
                    ),
                });
            }
            owners.push((tool.name.as_str(), format!("{label}, {field}")));
        }
        tools.extend(skill.spec.tools.iter().cloned());
        uses.push(SkillUse {
            name: skill.name.clone(),
            version: skill.spec.version.clone(),
            digest: skill.digest.clone(),
            tools: skill.spec.tools.iter().map(|t| t.name.clone()).collect(),
            fragments: skill.spec.prompt_fragments.clone(),
        });
    }
    let always_offered = agent
        .discovery
        .iter()
        .flat_map(|d| d.always_offer.iter().enumerate());
    for (i, name) in always_offered {
        if !tools.iter().any(|t| t.name == *name) {
            return Err(Conflict {
                reason: reason::INVALID_SPEC,
                field: format!("spec.discovery.alwaysOffer[{i}]"),
                message: format!(
                    "names tool {name}, which neither the Agent nor its skills declare; list only names of its tools"
                ),
            });
        }
    }
    Ok((tools, uses))
}

/// What the API server's rules refuse in a tool and a run must refuse too (files given to
/// `contextos run` are not admitted by an API server): a cache on a tool that is not read-only
/// or reads memory, and a name reserved for built-in tools — with the field at fault.
fn tool_problem(tool: &Tool) -> Option<(&'static str, String)> {
    if tool.cache.is_some() && (tool.risk != ToolRisk::ReadOnly || tool.adapter.memory.is_some()) {
        return Some((
            "cache",
            format!(
                "tool {}: only a read_only tool's results may be cached, and memory is never cached: remove cache or declare risk: read_only",
                tool.name
            ),
        ));
    }
    if tool.cache.is_some() && tool.kind == contextos_crds::common::ToolKind::Verify {
        return Some((
            "cache",
            format!(
                "tool {}: a verify tool checks what an action did and must read it afresh: remove cache",
                tool.name
            ),
        ));
    }
    let per_session =
        tool.adapter.a2a.is_some() || tool.adapter.mcp.as_ref().is_some_and(|m| m.command.is_some());
    if tool.cache.is_some() && per_session {
        return Some((
            "cache",
            format!(
                "tool {}: answers of another agent (a2a) or of an MCP server started for each Session (mcp.command) are the Session's own and are never cached: remove cache",
                tool.name
            ),
        ));
    }
    tool.name.starts_with("contextos_").then(|| {
        ("name", format!(
            "tool {}: tool names starting with contextos_ are reserved for built-in tools; rename the tool",
            tool.name
        ))
    })
}

/// `pack` with the skills' prompt fragments as inline sources after its own (a source of the
/// pack with a fragment's name is a conflict the operator reports; here the pack's wins).
pub fn pack_with_fragments(pack: &ContextPackSpec, skills: &[SkillUse]) -> ContextPackSpec {
    let mut pack = pack.clone();
    for skill in skills {
        for fragment in &skill.fragments {
            let name = SkillUse::source_name(&skill.name, &fragment.name);
            if pack.sources.iter().any(|s| s.name == name) {
                continue;
            }
            pack.sources.push(ContextSource {
                name,
                kind: fragment.kind,
                priority: fragment.priority,
                max_tokens: fragment.max_tokens,
                required: fragment.required,
                inline: Some(fragment.text.clone()),
                config_map_ref: None,
                memory: None,
            });
        }
    }
    pack
}

/// A pack source named like one of the skills' fragments, if any (`Ready=False`: the context
/// would hold one of them only).
pub fn fragment_clash(pack_name: &str, pack: &ContextPackSpec, skills: &[SkillUse]) -> Option<Conflict> {
    skills.iter().enumerate().find_map(|(i, skill)| {
        skill.fragments.iter().find_map(|fragment| {
            let name = SkillUse::source_name(&skill.name, &fragment.name);
            pack.sources.iter().any(|s| s.name == name).then(|| Conflict {
                reason: reason::SKILL_CONFLICT,
                field: format!("spec.skillRefs[{i}]"),
                message: format!(
                    "ContextPack {pack_name} has a source named {name}, the name Skill {}'s prompt fragment {} is compiled under; rename the source",
                    skill.name, fragment.name
                ),
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, risk: ToolRisk) -> Tool {
        serde_json::from_value(serde_json::json!({
            "name": name, "risk": risk.as_str(), "kind": "observe",
            "adapter": {"http": {"url": "http://tools.example/x"}},
        }))
        .expect("tool")
    }

    fn agent(tools: Vec<Tool>) -> AgentSpec {
        let mut spec: AgentSpec = serde_yaml::from_str::<serde_json::Value>(include_str!(
            "../../../examples/quickstart/agent.yaml"
        ))
        .ok()
        .and_then(|v| serde_json::from_value(v["spec"].clone()).ok())
        .expect("quickstart agent");
        spec.tools = tools;
        spec
    }

    fn skill(name: &str, tools: Vec<Tool>) -> NamedSkill {
        NamedSkill {
            name: name.into(),
            digest: format!("sha256:{name}"),
            spec: serde_json::from_value(serde_json::json!({
                "version": "1.0.0",
                "tools": tools,
                "promptFragments": [{"name": "how", "text": format!("Use {name} carefully."), "priority": 700}],
                "evals": {"policyRefs": [{"name": "p"}], "scenarios": [{
                    "name": "s", "request": "r", "script": {"turns": [{"content": "done"}]}, "expect": {}
                }]},
            }))
            .expect("skill"),
        }
    }

    const ANY: ToolCeiling<'static> = ToolCeiling {
        profile: "restricted",
        max_risk: None,
    };

    #[test]
    fn skills_tools_follow_the_agents_own_in_order() {
        let (tools, uses) = compose(
            &agent(vec![tool("own", ToolRisk::ReadOnly)]),
            &[
                skill("diagnosis", vec![tool("status", ToolRisk::ReadOnly)]),
                skill("mitigation", vec![tool("restart", ToolRisk::Destructive)]),
            ],
            ANY,
        )
        .expect("composes");
        let names: Vec<_> = tools.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["own", "status", "restart"]);
        assert_eq!(uses[1].tools, ["restart"]);
        assert_eq!(uses[1].digest, "sha256:mitigation");
    }

    #[test]
    fn one_tool_name_twice_names_both_declarers() {
        let two_skills = compose(
            &agent(vec![]),
            &[
                skill("diagnosis", vec![tool("status", ToolRisk::ReadOnly)]),
                skill("other", vec![tool("status", ToolRisk::ReadOnly)]),
            ],
            ANY,
        )
        .expect_err("conflict");
        assert_eq!(two_skills.reason, reason::SKILL_CONFLICT);
        assert_eq!(two_skills.field, "spec.skillRefs[1]");
        assert!(
            two_skills.message.contains("Skill other") && two_skills.message.contains("Skill diagnosis"),
            "{two_skills}"
        );
        let with_agent = compose(
            &agent(vec![tool("status", ToolRisk::ReadOnly)]),
            &[skill("diagnosis", vec![tool("status", ToolRisk::ReadOnly)])],
            ANY,
        )
        .expect_err("conflict");
        assert!(
            with_agent.message.contains("the Agent's spec.tools"),
            "{with_agent}"
        );
    }

    #[test]
    fn a_tool_above_the_profiles_ceiling_is_refused_whoever_declares_it() {
        let ceiling = ToolCeiling {
            profile: "restricted",
            max_risk: Some(ToolRisk::Network),
        };
        let skills = [skill("mitigation", vec![tool("restart", ToolRisk::Destructive)])];
        let err = compose(&agent(vec![]), &skills, ceiling).expect_err("too risky");
        assert_eq!(err.reason, reason::SKILL_CONFLICT);
        assert!(
            err.message.contains("restart")
                && err.message.contains("restricted")
                && err.message.contains("network"),
            "{err}"
        );
        let own = compose(&agent(vec![tool("wipe", ToolRisk::Destructive)]), &[], ceiling).expect_err("own");
        assert_eq!(
            (own.reason, own.field.as_str()),
            (reason::INVALID_SPEC, "spec.tools[0]")
        );
        compose(&agent(vec![tool("post", ToolRisk::Network)]), &[], ceiling).expect("at the ceiling");
    }

    #[test]
    fn fragments_join_the_pack_as_sources_and_a_clash_is_named() {
        let (_, uses) = compose(
            &agent(vec![]),
            &[skill("diagnosis", vec![tool("status", ToolRisk::ReadOnly)])],
            ANY,
        )
        .expect("composes");
        let pack: ContextPackSpec = serde_json::from_value(serde_json::json!({
            "instructions": "Help.", "tokenBudget": 4000, "sources": []
        }))
        .expect("pack");
        let with = pack_with_fragments(&pack, &uses);
        let source = &with.sources[0];
        assert_eq!(source.name, "skill.diagnosis.how");
        assert_eq!(
            (source.priority, source.inline.as_deref()),
            (700, Some("Use diagnosis carefully."))
        );
        assert!(fragment_clash("oncall", &pack, &uses).is_none());
        let clash = fragment_clash("oncall", &with, &uses).expect("clash");
        assert!(clash.message.contains("skill.diagnosis.how"), "{clash}");
    }
}
