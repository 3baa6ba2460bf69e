//! The PriceList kind: what models and paid tools cost, maintained by cluster admins as YAML.
//! Cluster-scoped: tenants read prices and never set them. Once a cluster has a PriceList, every
//! Agent's model must be priced by one (an unpriced model is `Ready=False`, never a free call);
//! tools are priced per call by the endpoint they reach (a tool no price covers costs nothing in
//! money, and is still counted by `toolCalls` limits). A run pins its prices when it starts, and
//! the gateway records each model turn's and each tool call's cost with them.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::agent::ModelProvider;

/// Prices, in one currency.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "contextos.dev",
    version = "v1alpha1",
    kind = "PriceList",
    plural = "pricelists",
    doc = "What model calls cost, per million tokens, and what calls to paid tools cost, per call, in one currency. Cluster-scoped, kept by admins. Once one exists, every Agent's model must be priced (an unpriced model is Ready=False); each model turn's and each priced tool call's cost is recorded with the run.",
    shortname = "cprice",
    category = "contextos",
    printcolumn(name = "Currency", type_ = "string", json_path = ".spec.currency"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.models) && size(self.models) > 0) || (has(self.tools) && size(self.tools) > 0)").message("a PriceList prices nothing: add spec.models or spec.tools"))]
pub struct PriceListSpec {
    /// The ISO 4217 code every price here is in, e.g. `USD`.
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
    /// Model prices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    pub models: Vec<ModelPrice>,
    /// Per-call prices of tools, by the endpoint they reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 500))]
    pub tools: Vec<ToolPrice>,
}

/// What one call to a paid tool costs. A tool is priced by the URL its adapter reaches (an
/// `http`, `webhook` or `mcp.url` adapter), never by anything its Agent says about itself, so
/// a tenant cannot make a paid API free by naming its tool otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.urlPrefix.contains('?') || self.urlPrefix.contains('#') || self.urlPrefix.contains('@'))").message("urlPrefix is a scheme, host and path: no query, fragment or credentials")
)]
pub struct ToolPrice {
    /// The tools whose URL starts with this: host (a port only if it must match; without one,
    /// either scheme and any port) and a path prefix matched whole segment by segment, e.g.
    /// `https://api.search.example/v1` prices `…/v1/search` but not `…/v10`. Paths are read
    /// the widest way a server may take them (percent-decoded, `;` parameters dropped, any
    /// case), so a spelling some server routes to a priced path is charged; the longest prefix
    /// that matches a tool prices it.
    #[schemars(
        length(min = 1, max = 2048),
        regex(
            pattern = r"^https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}))?(/[^\s]*)?$"
        )
    )]
    pub url_prefix: String,
    /// Only this tool of an MCP server at that URL (the server's name for it: `adapter.mcp.tool`,
    /// or the Agent's tool name when that is unset); unset: every call that reaches the URL. A
    /// price naming the tool wins over one that does not, whatever their prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub mcp_tool: Option<String>,
    /// What one call costs, a decimal such as `0.005`: charged once for each call the gateway
    /// carries out (however many attempts it takes), never for a call that is denied or waits.
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub per_call: String,
}

/// What one model costs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.provider != 'scripted' || !has(self.endpoint)").message("a scripted model has no endpoint: remove endpoint"),
    validation = Rule::new("!has(self.endpoint) || !(self.endpoint.contains('?') || self.endpoint.contains('#') || self.endpoint.contains('@'))").message("endpoint is a base URL: no query, fragment or credentials")
)]
pub struct ModelPrice {
    /// The API the Agent speaks (`spec.model.provider`).
    pub provider: ModelProvider,
    /// The model's name as the Agent names it (`spec.model.model`).
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Only for this endpoint (`spec.model.endpoint`); unset: any. A price for the endpoint
    /// wins over one for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://[^\s]+$"))]
    pub endpoint: Option<String>,
    /// Per million prompt tokens, a decimal such as `2.50`.
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub input_per_million: String,
    /// Per million completion tokens.
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub output_per_million: String,
    /// Per million prompt tokens the endpoint served from its cache; unset: the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,9}(\.[0-9]{1,9})?$"))]
    pub cached_input_per_million: Option<String>,
}
