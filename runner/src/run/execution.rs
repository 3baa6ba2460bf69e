//! Which tools execute code, and whether a SandboxProfile lets them: a tool whose MCP server is
//! started from a command (stdio) runs code the Agent names. The profile's `execution` section
//! says which tools may (`allowedTools` globs) and up to which risk (`maxRisk`). Pure.

use contextos_crds::{agent::Tool, sandbox_profile::ExecutionSpec};

use crate::policy::glob::Glob;

/// Whether calling `tool` starts code the Agent names (a stdio MCP server).
pub fn executes_code(tool: &Tool) -> bool {
    tool.adapter.mcp.as_ref().is_some_and(|mcp| mcp.command.is_some())
}

/// The first tool that would execute code the profile does not allow, as a message naming the
/// Agent's field, the profile's field and the fix.
pub fn execution_refused(tools: &[Tool], execution: &ExecutionSpec, profile: &str) -> Option<String> {
    let globs: Vec<Glob> = execution.allowed_tools.iter().map(|g| Glob::new(g)).collect();
    tools.iter().enumerate().find_map(|(i, tool)| {
        if !executes_code(tool) {
            return None;
        }
        if !globs.iter().any(|g| g.matches(&tool.name)) {
            return Some(format!(
                "spec.tools[{i}] ({}) starts an MCP server from a command, which executes code; SandboxProfile {profile} allows that to no tool named so (spec.execution.allowedTools); add the tool there or serve it over streamable HTTP (adapter.mcp.url)",
                tool.name
            ));
        }
        (tool.risk > execution.max_risk).then(|| {
            format!(
                "spec.tools[{i}] ({}) executes code at risk {}, above what SandboxProfile {profile} allows (spec.execution.maxRisk: {})",
                tool.name,
                tool.risk.as_str(),
                execution.max_risk.as_str()
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use contextos_crds::common::ToolRisk;

    use super::*;

    fn tool(name: &str, risk: &str, stdio: bool) -> Tool {
        let adapter = if stdio {
            serde_json::json!({"mcp": {"command": ["mcp-server"]}})
        } else {
            serde_json::json!({"mcp": {"url": "http://mcp:8080/mcp"}})
        };
        serde_json::from_value(serde_json::json!({
            "name": name, "description": "d", "risk": risk, "kind": "observe", "adapter": adapter,
        }))
        .expect("tool")
    }

    #[test]
    fn code_runs_only_for_listed_tools_up_to_the_profiles_risk() {
        let execution = ExecutionSpec {
            allowed_tools: vec!["fs_*".into()],
            max_risk: ToolRisk::LocalWrite,
        };
        assert_eq!(
            execution_refused(&[tool("fs_read", "read_only", true)], &execution, "p"),
            None
        );
        assert_eq!(
            execution_refused(&[tool("anything", "destructive", false)], &execution, "p"),
            None
        );
        let unlisted =
            execution_refused(&[tool("shell", "read_only", true)], &execution, "p").expect("refused");
        assert!(
            unlisted.contains("spec.tools[0] (shell)") && unlisted.contains("allowedTools"),
            "{unlisted}"
        );
        let risky =
            execution_refused(&[tool("fs_write", "network", true)], &execution, "p").expect("refused");
        assert!(risky.contains("maxRisk"), "{risky}");
        let none = ExecutionSpec::default();
        assert!(execution_refused(&[tool("fs_read", "read_only", true)], &none, "p").is_some());
    }
}
