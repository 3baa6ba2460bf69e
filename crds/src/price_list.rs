//! The PriceList kind: what models cost, maintained by cluster admins as YAML. Cluster-scoped:
//! tenants read prices and never set them. Once a cluster has a PriceList, every Agent's model
//! must be priced by one (an unpriced model is `Ready=False`, never a free call); a run pins its
//! model's price when it starts, and the gateway records each model turn's cost with it.

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
    doc = "What model calls cost, per million tokens, in one currency. Cluster-scoped, kept by admins. Once one exists, every Agent's model must be priced (an unpriced model is Ready=False); each model turn's cost is recorded with the run.",
    shortname = "cprice",
    category = "contextos",
    printcolumn(name = "Currency", type_ = "string", json_path = ".spec.currency"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct PriceListSpec {
    /// The ISO 4217 code every price here is in, e.g. `USD`.
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
    /// Model prices.
    #[schemars(length(min = 1, max = 500))]
    pub models: Vec<ModelPrice>,
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
