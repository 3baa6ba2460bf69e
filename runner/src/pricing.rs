//! What model calls and paid tools cost. A run's prices are looked up in the cluster's
//! PriceLists when the run starts and pinned in its bundle, so the run, its resume and its
//! replays cost the same whatever the lists say later; each model turn's cost is computed from
//! its token counts, and each priced tool call costs its price, recorded with it. Amounts are
//! whole nano-units of a currency (10⁻⁹), so sums never drift.

use std::{collections::BTreeMap, fmt};

use contextos_crds::{
    PriceListSpec,
    agent::{ModelProvider, ModelSpec, Tool},
};
use serde::{Deserialize, Serialize};

/// An amount of a currency, in nano-units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Nanos(pub u64);

const NANOS_PER_UNIT: u64 = 1_000_000_000;

impl Nanos {
    /// A decimal such as `2.50` (at most 9 digits on either side of the point).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a decimal amount such as 2.50");
        let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
        let digits =
            |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole, 9) || !(fraction.is_empty() || digits(fraction, 9)) || text.ends_with('.') {
            return Err(bad());
        }
        let whole: u64 = whole.parse().map_err(|_| bad())?;
        let fraction: u64 = format!("{fraction:0<9}").parse().map_err(|_| bad())?;
        Ok(Self(whole * NANOS_PER_UNIT + fraction))
    }
}

impl std::ops::Add for Nanos {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Self(self.0.saturating_add(other.0))
    }
}

impl std::iter::Sum for Nanos {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
    }
}

impl fmt::Display for Nanos {
    /// Whole units and the fraction without trailing zeros (at least two places): `0.0012`,
    /// `3.00`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / NANOS_PER_UNIT;
        let fraction = format!("{:09}", self.0 % NANOS_PER_UNIT);
        let trimmed = fraction.trim_end_matches('0');
        write!(f, "{whole}.{trimmed:0<2}")
    }
}

/// A model's price as a run pins it: the list it came from and its rates per million tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinnedPrice {
    pub price_list: String,
    pub currency: String,
    pub input_per_million: Nanos,
    pub output_per_million: Nanos,
    pub cached_input_per_million: Nanos,
}

/// A tool's price per call as a run pins it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinnedToolPrice {
    pub price_list: String,
    pub currency: String,
    pub per_call: Nanos,
}

impl PinnedToolPrice {
    /// What one call costs.
    pub fn cost(&self) -> TurnCost {
        TurnCost {
            currency: self.currency.clone(),
            nanos: self.per_call,
        }
    }
}

/// What one model turn, or one tool call, cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnCost {
    pub currency: String,
    pub nanos: Nanos,
}

impl PinnedPrice {
    /// The cost of a turn of `prompt` tokens (`cached` of them from the endpoint's cache) and
    /// `completion` tokens, rounded to the nearest nano-unit.
    pub fn cost(&self, prompt: u64, cached: u64, completion: u64) -> TurnCost {
        let cached = cached.min(prompt);
        let per = |tokens: u64, rate: Nanos| u128::from(tokens) * u128::from(rate.0);
        let total = per(prompt - cached, self.input_per_million)
            + per(cached, self.cached_input_per_million)
            + per(completion, self.output_per_million);
        let nanos = (total + 500_000) / 1_000_000;
        TurnCost {
            currency: self.currency.clone(),
            nanos: Nanos(u64::try_from(nanos).unwrap_or(u64::MAX)),
        }
    }
}

/// Why a model cannot be priced.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error(
        "no PriceList prices model {model:?} of provider {provider}{endpoint}: add it to a PriceList's spec.models (the cluster has {lists}), so its calls are never free"
    )]
    Missing {
        model: String,
        provider: &'static str,
        endpoint: String,
        lists: String,
    },
    #[error("model {model:?} is priced differently by {first} and {second}: keep one price")]
    Conflict {
        model: String,
        first: String,
        second: String,
    },
    #[error(
        "tool {tool:?} ({url}) is priced differently by {first} and {second}, with prefixes as long as each other: keep one price, or make one prefix longer"
    )]
    ToolConflict {
        tool: String,
        url: String,
        first: String,
        second: String,
    },
    #[error(
        "tool {tool:?} calls an operation of an OpenAPI document under {url}, and {price} prices {prefix}, below that: which operation is called is only known once the document is read, so set the tool's adapter.openapi.server to the priced URL, or price the whole API"
    )]
    BelowOpenApiReach {
        tool: String,
        url: String,
        price: String,
        prefix: String,
    },
    #[error("PriceList {list}: spec.{section}[{index}].{field}: {problem}")]
    Invalid {
        list: String,
        section: &'static str,
        index: usize,
        field: &'static str,
        problem: String,
    },
}

fn provider_name(provider: ModelProvider) -> &'static str {
    match provider {
        ModelProvider::OpenaiCompatible => "openai_compatible",
        ModelProvider::Scripted => "scripted",
    }
}

/// Whether two endpoints are the same server and path, as an HTTP client reaches them: scheme
/// and host in any case, the default port written or not, `.` segments and a trailing `/`
/// aside. One with credentials, a query or a fragment is never the same as a price's.
fn same_endpoint(a: &str, b: &str) -> bool {
    let normal = |text: &str| {
        let url = url::Url::parse(text).ok()?;
        let plain = url.username().is_empty()
            && url.password().is_none()
            && url.query().is_none()
            && url.fragment().is_none();
        plain.then(|| {
            format!(
                "{}://{}:{}{}",
                url.scheme(),
                url.host_str().unwrap_or_default(),
                url.port_or_known_default().unwrap_or_default(),
                url.path().trim_end_matches('/')
            )
        })
    };
    matches!((normal(a), normal(b)), (Some(a), Some(b)) if a == b)
}

/// The price of `model` in `lists` (by name). No list at all: `None` (spend is not accounted
/// in this cluster). A scripted model no list prices costs nothing: `None`. Any other model
/// must be priced, by exactly one price (one for its endpoint wins over one for any endpoint).
pub fn price_for(
    lists: &[(String, PriceListSpec)],
    model: &ModelSpec,
) -> Result<Option<PinnedPrice>, PriceError> {
    // Only lists that price models make pricing models required (a list of tool prices
    // alone does not).
    if lists.iter().all(|(_, list)| list.models.is_empty()) {
        return Ok(None);
    }
    let mut found: Vec<(bool, PinnedPrice)> = Vec::new();
    for (name, list) in lists {
        for (index, entry) in list.models.iter().enumerate() {
            if entry.provider != model.provider || entry.model != model.model {
                continue;
            }
            let specific = match (&entry.endpoint, &model.endpoint) {
                (None, _) => false,
                (Some(e), Some(m)) if same_endpoint(e, m) => true,
                (Some(_), _) => continue,
            };
            let rate = |field: &'static str, text: &str| {
                Nanos::parse(text).map_err(|problem| PriceError::Invalid {
                    list: name.clone(),
                    section: "models",
                    index,
                    field,
                    problem,
                })
            };
            let input = rate("inputPerMillion", &entry.input_per_million)?;
            let cached = match &entry.cached_input_per_million {
                Some(text) => rate("cachedInputPerMillion", text)?,
                None => input,
            };
            found.push((
                specific,
                PinnedPrice {
                    price_list: name.clone(),
                    currency: list.currency.clone(),
                    input_per_million: input,
                    output_per_million: rate("outputPerMillion", &entry.output_per_million)?,
                    cached_input_per_million: cached,
                },
            ));
        }
    }
    let specific = found.iter().any(|(s, _)| *s);
    let mut candidates = found.into_iter().filter(|(s, _)| *s == specific).map(|(_, p)| p);
    let Some(first) = candidates.next() else {
        if model.provider == ModelProvider::Scripted {
            return Ok(None);
        }
        return Err(PriceError::Missing {
            model: model.model.clone(),
            provider: provider_name(model.provider),
            endpoint: model
                .endpoint
                .as_deref()
                .map(|e| format!(" at {e}"))
                .unwrap_or_default(),
            lists: lists
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let rates = |p: &PinnedPrice| {
        (
            p.currency.clone(),
            p.input_per_million,
            p.output_per_million,
            p.cached_input_per_million,
        )
    };
    if let Some(other) = candidates.find(|p| rates(p) != rates(&first)) {
        let second = match first.price_list == other.price_list {
            true => "another of its entries".to_owned(),
            false => format!("PriceList {}", other.price_list),
        };
        return Err(PriceError::Conflict {
            model: model.model.clone(),
            first: format!("PriceList {}", first.price_list),
            second,
        });
    }
    Ok(Some(first))
}

/// A URL as servers may take it, for prices: its host (lowercase, without a trailing dot), its
/// port if one is written, and its path as segments read the widest way any common server
/// does — percent-decoded, split again at `/` and `\\`, each segment's `;` parameters dropped,
/// `.` and `..` resolved, compared in lowercase. So a tool written `https://API.example/v%31/x`,
/// `…/V1;s=1/x` or `…/v1%2Fx` is priced as `https://api.example/v1/x` is: a spelling some server
/// routes to a priced path is charged rather than let through free. `None` for what is not an
/// http(s) URL.
fn reached(text: &str) -> Option<Reached> {
    let url = url::Url::parse(text).ok()?;
    if !matches!(url.scheme(), "http" | "https") {
        return None;
    }
    let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    let mut path: Vec<String> = Vec::new();
    for raw in url.path_segments().into_iter().flatten() {
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        for piece in decoded.split(['/', '\\']) {
            let segment = piece.split(';').next().unwrap_or_default().to_lowercase();
            match segment.as_str() {
                "" | "." => {}
                ".." => {
                    path.pop();
                }
                _ => path.push(segment),
            }
        }
    }
    Some(Reached {
        host,
        port: url.port_or_known_default()?,
        port_written: url.port().is_some(),
        path,
    })
}

/// Where a URL goes, as [`reached`] reads it.
struct Reached {
    host: String,
    port: u16,
    /// Whether the URL names its port (a price without one covers the host on any port and
    /// either scheme).
    port_written: bool,
    path: Vec<String>,
}

impl Reached {
    /// Whether a price for `self` (a URL prefix) covers a tool reaching `tool`.
    fn covers(&self, tool: &Self) -> bool {
        self.host == tool.host
            && (!self.port_written || self.port == tool.port)
            && tool.path.starts_with(&self.path)
    }
}

/// The URL a tool's adapter reaches, and the name its MCP server knows it by (MCP tools only).
fn tool_target(tool: &Tool) -> Option<(&str, Option<&str>)> {
    use contextos_crds::agent::Adapter;
    match tool.adapter.chosen()? {
        Adapter::Http(http) => Some((&http.url, None)),
        Adapter::Webhook(hook) => Some((&hook.url, None)),
        Adapter::OpenApi(api) => Some((openapi_reach(api), None)),
        Adapter::A2a(agent) => Some((&agent.url, None)),
        Adapter::Mcp(mcp) => Some((
            mcp.url.as_deref()?,
            Some(mcp.tool.as_deref().unwrap_or(&tool.name)),
        )),
        // The gateway's own: no endpoint to price.
        Adapter::Memory(_) => None,
    }
}

/// Where an OpenAPI tool's calls may go before its document is read: below the `server` the
/// Agent names, else anywhere on the document's origin (its servers must be there).
fn openapi_reach(api: &contextos_crds::agent::OpenApiAdapter) -> &str {
    match &api.server {
        Some(server) => server,
        None => {
            let after_scheme = api.document.find("://").map_or(0, |i| i + 3);
            let end = api.document[after_scheme..]
                .find(['/', '?', '#'])
                .map_or(api.document.len(), |i| after_scheme + i);
            &api.document[..end]
        }
    }
}

/// The per-call prices of `tools` in `lists`, by tool name: for each tool, a price naming its
/// MCP tool before one that does not, then the one whose URL prefix matches the most segments
/// of the URL it reaches. A tool no price covers is not in the map: its calls cost nothing in
/// money. Two prices as specific as each other that differ are refused.
pub fn tool_prices(
    lists: &[(String, PriceListSpec)],
    tools: &[Tool],
) -> Result<BTreeMap<String, PinnedToolPrice>, PriceError> {
    let mut prices = BTreeMap::new();
    for tool in tools {
        let Some((url, mcp_tool)) = tool_target(tool) else {
            continue;
        };
        let Some(target) = reached(url) else {
            continue;
        };
        // (names the MCP tool, segments matched), and the price.
        let mut found: Vec<((bool, usize), PinnedToolPrice)> = Vec::new();
        for (name, list) in lists {
            for (index, entry) in list.tools.iter().enumerate() {
                let Some(prefix) = reached(&entry.url_prefix) else {
                    return Err(PriceError::Invalid {
                        list: name.clone(),
                        section: "tools",
                        index,
                        field: "urlPrefix",
                        problem: format!("{:?} is not an http(s) URL", entry.url_prefix),
                    });
                };
                if !prefix.covers(&target) {
                    // An OpenAPI tool may reach any path below its reach: a price there must
                    // not be dodged by declaring the API's URL instead of the operation's.
                    if tool.adapter.openapi.is_some() && target.covers(&prefix) {
                        return Err(PriceError::BelowOpenApiReach {
                            tool: tool.name.clone(),
                            url: url.to_owned(),
                            price: format!("PriceList {name}"),
                            prefix: entry.url_prefix.clone(),
                        });
                    }
                    continue;
                }
                let names_tool = match (&entry.mcp_tool, mcp_tool) {
                    (None, _) => false,
                    (Some(wanted), Some(called)) if wanted == called => true,
                    (Some(_), _) => continue,
                };
                let per_call = Nanos::parse(&entry.per_call).map_err(|problem| PriceError::Invalid {
                    list: name.clone(),
                    section: "tools",
                    index,
                    field: "perCall",
                    problem,
                })?;
                found.push((
                    (names_tool, prefix.path.len()),
                    PinnedToolPrice {
                        price_list: name.clone(),
                        currency: list.currency.clone(),
                        per_call,
                    },
                ));
            }
        }
        let Some(best) = found.iter().map(|(rank, _)| *rank).max() else {
            continue;
        };
        let mut candidates = found
            .into_iter()
            .filter(|(rank, _)| *rank == best)
            .map(|(_, p)| p);
        let Some(first) = candidates.next() else {
            continue;
        };
        let rates = |p: &PinnedToolPrice| (p.currency.clone(), p.per_call);
        if let Some(other) = candidates.find(|p| rates(p) != rates(&first)) {
            let second = match first.price_list == other.price_list {
                true => "another of its entries".to_owned(),
                false => format!("PriceList {}", other.price_list),
            };
            return Err(PriceError::ToolConflict {
                tool: tool.name.clone(),
                url: url.to_owned(),
                first: format!("PriceList {}", first.price_list),
                second,
            });
        }
        prices.insert(tool.name.clone(), first);
    }
    Ok(prices)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_and_print_exactly() {
        let cases = [
            ("0", Ok(0)),
            ("2.50", Ok(2_500_000_000)),
            ("0.000000001", Ok(1)),
            ("123456789.123456789", Ok(123_456_789_123_456_789)),
        ];
        for (text, wanted) in cases {
            assert_eq!(
                Nanos::parse(text).map(|n| n.0).map_err(|_| ()),
                wanted.map_err(|_: ()| ()),
                "{text}"
            );
        }
        for bad in ["", ".5", "5.", "1.0000000001", "-1", "1e3", "1,5", "1234567890"] {
            assert!(Nanos::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(Nanos(2_500_000_000).to_string(), "2.50");
        assert_eq!(Nanos(1_200_000).to_string(), "0.0012");
        assert_eq!(Nanos(0).to_string(), "0.00");
        assert_eq!(Nanos(1).to_string(), "0.000000001");
    }

    fn price(input: &str, output: &str, cached: Option<&str>) -> contextos_crds::price_list::ModelPrice {
        contextos_crds::price_list::ModelPrice {
            provider: ModelProvider::OpenaiCompatible,
            model: "gpt".into(),
            endpoint: None,
            input_per_million: input.into(),
            output_per_million: output.into(),
            cached_input_per_million: cached.map(str::to_owned),
        }
    }

    fn list(
        name: &str,
        currency: &str,
        models: Vec<contextos_crds::price_list::ModelPrice>,
    ) -> (String, PriceListSpec) {
        (
            name.into(),
            PriceListSpec {
                currency: currency.into(),
                models,
                tools: vec![],
            },
        )
    }

    fn model(provider: ModelProvider, name: &str, endpoint: Option<&str>) -> ModelSpec {
        ModelSpec {
            provider,
            endpoint: endpoint.map(str::to_owned),
            model: name.into(),
            secret_ref: None,
            script_ref: None,
            max_output_tokens: None,
        }
    }

    #[test]
    fn a_turn_costs_its_tokens_at_the_pinned_rates() {
        let lists = [list("usd", "USD", vec![price("2.50", "10.00", Some("1.25"))])];
        let pinned = price_for(
            &lists,
            &model(ModelProvider::OpenaiCompatible, "gpt", Some("https://x/v1")),
        )
        .expect("priced")
        .expect("a price");
        // 1,000 prompt tokens (400 cached) and 200 completion tokens:
        // 600 × 2.50 + 400 × 1.25 + 200 × 10.00 per million = 0.0015 + 0.0005 + 0.002.
        let cost = pinned.cost(1000, 400, 200);
        assert_eq!(
            (cost.currency.as_str(), cost.nanos.to_string()),
            ("USD", "0.004".to_owned())
        );
        // Cached tokens never exceed the prompt: 10 cached tokens at 1.25 per million.
        assert_eq!(pinned.cost(10, 50, 0).nanos, Nanos(12_500));
        // Rounding is to the nearest nano-unit: 300 and 100 tokens at 0.0000025 per million.
        let tiny = PinnedPrice {
            input_per_million: Nanos(2_500),
            ..pinned
        };
        assert_eq!(tiny.cost(300, 0, 0).nanos, Nanos(1));
        assert_eq!(tiny.cost(100, 0, 0).nanos, Nanos(0));
    }

    #[test]
    fn every_model_in_use_is_priced_exactly_once_when_the_cluster_prices_models() {
        let gpt = model(
            ModelProvider::OpenaiCompatible,
            "gpt",
            Some("https://api.example/v1"),
        );
        let script = model(ModelProvider::Scripted, "demo", None);
        // No PriceList: spend is not accounted.
        assert_eq!(price_for(&[], &gpt), Ok(None));
        let usd = list("usd", "USD", vec![price("1", "2", None)]);
        // Priced, the cached rate defaulting to the input rate.
        let pinned = price_for(std::slice::from_ref(&usd), &gpt)
            .expect("ok")
            .expect("priced");
        assert_eq!(pinned.cached_input_per_million, Nanos::parse("1").expect("1"));
        assert_eq!(pinned.price_list, "usd");
        // A scripted model no list prices costs nothing; any other model must be priced.
        assert_eq!(price_for(std::slice::from_ref(&usd), &script), Ok(None));
        let other = model(
            ModelProvider::OpenaiCompatible,
            "other",
            Some("https://api.example/v1"),
        );
        let missing = price_for(std::slice::from_ref(&usd), &other).expect_err("unpriced");
        assert!(
            missing.to_string().contains(
                "no PriceList prices model \"other\" of provider openai_compatible at https://api.example/v1"
            ),
            "{missing}"
        );
        // A price for the endpoint wins over one for any endpoint; one for another endpoint is
        // not this model's.
        let mut specific = price("5", "6", None);
        specific.endpoint = Some("https://api.example/v1/".into());
        let mut elsewhere = price("7", "8", None);
        elsewhere.endpoint = Some("https://elsewhere/v1".into());
        let lists = [usd.clone(), list("endpoints", "USD", vec![specific, elsewhere])];
        let pinned = price_for(&lists, &gpt).expect("ok").expect("priced");
        assert_eq!(
            (pinned.price_list.as_str(), pinned.input_per_million),
            ("endpoints", Nanos::parse("5").expect("5"))
        );
        // Written otherwise, the same server and path is the same endpoint: it cannot fall
        // back to a cheaper price for any endpoint. With a query or credentials it is not.
        for same in [
            "https://API.Example/v1",
            "https://api.example:443/v1",
            "https://api.example/./v1/",
        ] {
            let written = model(ModelProvider::OpenaiCompatible, "gpt", Some(same));
            let pinned = price_for(&lists, &written).expect("ok").expect("priced");
            assert_eq!(pinned.price_list, "endpoints", "{same}");
        }
        for other in [
            "https://api.example/v1?x=1",
            "https://user@api.example/v1",
            "https://api.example:8443/v1",
        ] {
            let written = model(ModelProvider::OpenaiCompatible, "gpt", Some(other));
            let pinned = price_for(&lists, &written).expect("ok").expect("priced");
            assert_eq!(pinned.price_list, "usd", "{other}");
        }
        // Two prices as specific as each other that differ (rates or currency): refused.
        let eur = list("eur", "EUR", vec![price("1", "2", None)]);
        let conflict = price_for(&[usd.clone(), eur], &gpt).expect_err("ambiguous");
        assert!(matches!(conflict, PriceError::Conflict { .. }), "{conflict}");
        // The same price twice is not a conflict.
        let again = list("again", "USD", vec![price("1.0", "2.00", None)]);
        assert!(price_for(&[usd, again], &gpt).is_ok());
        // A rate that is not a decimal names the list, entry and field.
        let broken = list("broken", "USD", vec![price("1", "two", None)]);
        let invalid = price_for(&[broken], &gpt).expect_err("invalid");
        assert!(
            invalid
                .to_string()
                .starts_with("PriceList broken: spec.models[0].outputPerMillion"),
            "{invalid}"
        );
    }

    fn tool(name: &str, adapter: &str) -> Tool {
        serde_yaml::from_str(&format!(
            "name: {name}\ndescription: d\nrisk: read_only\nkind: observe\nadapter: {adapter}\n"
        ))
        .expect("tool")
    }

    fn priced_tools(entries: &[(&str, Option<&str>, &str)]) -> PriceListSpec {
        PriceListSpec {
            currency: "USD".into(),
            models: vec![],
            tools: entries
                .iter()
                .map(
                    |(prefix, mcp_tool, per_call)| contextos_crds::price_list::ToolPrice {
                        url_prefix: (*prefix).into(),
                        mcp_tool: mcp_tool.map(str::to_owned),
                        per_call: (*per_call).into(),
                    },
                )
                .collect(),
        }
    }

    #[test]
    fn a_tool_is_priced_by_the_longest_prefix_of_the_url_it_reaches_however_it_is_written() {
        let lists = [(
            "tools".to_owned(),
            priced_tools(&[
                ("https://api.search.example/v1", None, "0.005"),
                ("https://api.search.example/v1/premium/", None, "0.05"),
                ("https://mcp.example", Some("search"), "0.01"),
                ("https://mcp.example/mcp", None, "0.002"),
                ("https://ports.example:8080", None, "0.002"),
            ]),
        )];
        let http = |url: &str| format!("{{http: {{url: '{url}'}}}}");
        let cases = [
            (http("https://api.search.example/v1/search"), Some("0.005")),
            // The same server and path written otherwise is priced the same.
            (http("https://API.Search.Example.:443/v1/search"), Some("0.005")),
            (http("https://api.search.example/v%31/search"), Some("0.005")),
            (http("https://api.search.example/x/../v1/search"), Some("0.005")),
            (
                "{webhook: {url: 'https://api.search.example/v1/premium/go', secretRef: {name: s, key: k}}}"
                    .to_owned(),
                Some("0.05"),
            ),
            // Spellings some server routes to the priced path are charged: an encoded slash or
            // backslash, path parameters, another case, either scheme when the price names no
            // port, and `..` hidden in an encoded segment.
            (http("https://api.search.example/v1%2Fsearch"), Some("0.005")),
            (http("https://api.search.example/v1%5Csearch"), Some("0.005")),
            (http("https://api.search.example/v1;s=x/search"), Some("0.005")),
            (http("https://api.search.example/V1/Search"), Some("0.005")),
            (http("http://api.search.example/v1/search"), Some("0.005")),
            (http("https://api.search.example:8443/v1/search"), Some("0.005")),
            (
                http("https://api.search.example/v1/x%2F..%2Fpremium/go"),
                Some("0.05"),
            ),
            // Segments match whole; another host is another server, and so is another port
            // when the price names one.
            (http("https://api.search.example/v10/search"), None),
            (http("https://search.example/v1/search"), None),
            (http("https://ports.example:8080/v1"), Some("0.002")),
            (http("https://ports.example:8081/v1"), None),
            // An MCP server's tool by its server-side name, even under a longer prefix that
            // names no tool; the server's other tools by the longest prefix.
            ("{mcp: {url: 'https://mcp.example/mcp'}}".to_owned(), Some("0.01")),
            (
                "{mcp: {url: 'https://mcp.example/mcp', tool: lookup}}".to_owned(),
                Some("0.002"),
            ),
            ("{mcp: {command: [server]}}".to_owned(), None),
            // Another agent, by the URL the tool names (its card and endpoint are below it).
            (
                "{a2a: {url: 'https://api.search.example/v1/agents/triage', riskCeiling: network}}"
                    .to_owned(),
                Some("0.005"),
            ),
            ("{memory: {operation: recall}}".to_owned(), None),
        ];
        for (adapter, wanted) in &cases {
            let tools = [tool("search", adapter)];
            let prices = tool_prices(&lists, &tools).expect("priced");
            assert_eq!(
                prices.get("search").map(|p| p.per_call),
                wanted.map(|w| Nanos::parse(w).expect("amount")),
                "{adapter}"
            );
        }
        let pinned = &tool_prices(&lists, &[tool("search", &cases[0].0)]).expect("priced")["search"];
        assert_eq!(
            (
                pinned.price_list.as_str(),
                pinned.cost().currency.as_str(),
                pinned.cost().nanos
            ),
            ("tools", "USD", Nanos(5_000_000))
        );
    }

    #[test]
    fn tool_prices_that_conflict_or_do_not_parse_are_refused_naming_the_entry() {
        let search = [tool(
            "search",
            "{http: {url: 'https://api.search.example/v1/search'}}",
        )];
        let two = [
            (
                "a".to_owned(),
                priced_tools(&[("https://api.search.example/v1", None, "0.005")]),
            ),
            (
                "b".to_owned(),
                priced_tools(&[("https://api.search.example/v1/", None, "0.006")]),
            ),
        ];
        let conflict = tool_prices(&two, &search).expect_err("two prices");
        assert!(
            conflict
                .to_string()
                .starts_with("tool \"search\" (https://api.search.example/v1/search) is priced differently by PriceList a and PriceList b"),
            "{conflict}"
        );
        // A longer prefix settles it.
        let settled = [
            two[0].clone(),
            (
                "b".to_owned(),
                priced_tools(&[("https://api.search.example/v1/search", None, "0.006")]),
            ),
        ];
        assert_eq!(
            tool_prices(&settled, &search).expect("priced")["search"].per_call,
            Nanos(6_000_000)
        );
        let broken = [(
            "broken".to_owned(),
            priced_tools(&[("https://api.search.example", None, "free")]),
        )];
        let invalid = tool_prices(&broken, &search).expect_err("invalid");
        assert!(
            invalid
                .to_string()
                .starts_with("PriceList broken: spec.tools[0].perCall"),
            "{invalid}"
        );
    }

    #[test]
    fn an_openapi_tool_cannot_dodge_a_price_below_the_url_it_declares() {
        let lists = [(
            "pay".to_owned(),
            priced_tools(&[
                ("https://pay.example/v1", None, "0.001"),
                ("https://pay.example/v1/charges", None, "0.30"),
            ]),
        )];
        let openapi = |extra: &str| {
            tool(
                "charge",
                &format!(
                    "{{openapi: {{document: 'https://pay.example/openapi.json', operationId: createCharge{extra}}}}}"
                ),
            )
        };
        // Without a server the call may go anywhere on the document's origin.
        let refused = tool_prices(&lists, &[openapi("")]).expect_err("a price below its reach");
        assert!(
            refused
                .to_string()
                .contains("PriceList pay prices https://pay.example/v1"),
            "{refused}"
        );
        let refused =
            tool_prices(&lists, &[openapi(", server: 'https://pay.example/v1'")]).expect_err("below");
        assert!(
            refused
                .to_string()
                .contains("set the tool's adapter.openapi.server"),
            "{refused}"
        );
        // Named at the priced path, it is charged that price.
        let priced =
            tool_prices(&lists, &[openapi(", server: 'https://pay.example/v1/charges'")]).expect("priced");
        assert_eq!(priced["charge"].per_call, Nanos(300_000_000));
    }
}
