//! Where the gateway service's tool and model calls may go. An Agent chooses its endpoints, and
//! the gateway sends them requests from the one place that reaches the record store, cloud
//! metadata and the cluster's internals — so every destination is checked when it is connected
//! to: the addresses a name resolves to are filtered by a resolver the HTTP client uses (so a
//! name that resolves elsewhere on the next lookup gains nothing), IP literals are checked before
//! sending, and redirects are not followed. Denied always: link-local addresses (instance
//! metadata); denied by the gateway service: its own host (loopback, the unspecified addresses
//! and its pod's addresses, where its metrics listener answers with every tenant's spend);
//! denied by configuration: the record store's addresses and any listed network.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Networks no tool or model is reached in, whatever the configuration.
const ALWAYS_DENIED: [&str; 3] = ["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"];

/// The machine's own host as seen from itself: loopback, and the unspecified addresses, which a
/// connection on Linux takes to mean loopback too.
const OWN_HOST: [&str; 4] = ["127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"];

/// `ip`, or the IPv4 address an IPv4-mapped IPv6 address carries (denied networks are IPv4).
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// The denied destinations.
#[derive(Clone, Debug)]
pub struct EgressGuard {
    denied: Arc<RwLock<Vec<IpNet>>>,
}

impl Default for EgressGuard {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl EgressGuard {
    /// A guard denying `networks` besides the always-denied ones.
    pub fn new(networks: Vec<IpNet>) -> Self {
        let mut denied: Vec<IpNet> = ALWAYS_DENIED.iter().filter_map(|n| n.parse().ok()).collect();
        denied.extend(networks);
        Self {
            denied: Arc::new(RwLock::new(denied)),
        }
    }

    /// Also denies this machine's own host as it sees itself — loopback and the unspecified
    /// addresses —, as the gateway service does unless it runs on one machine with its tools:
    /// everything listening beside it (its metrics port, with every tenant's spend, its own API)
    /// is otherwise one tool URL away, and no NetworkPolicy sees a pod reach itself. (Its pod's
    /// own addresses are listed with the denied networks.)
    pub fn denying_own_host(self) -> Self {
        if let Ok(mut denied) = self.denied.write() {
            denied.extend(OWN_HOST.iter().filter_map(|n| n.parse::<IpNet>().ok()));
        }
        self
    }

    /// Denies every address `host` resolves to now (e.g. the record store's PD endpoints).
    pub async fn deny_host(&self, host: &str, port: u16) -> Result<(), String> {
        let addresses = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?;
        // A store on loopback is a single-machine setup (the gateway's own host): denying it would
        // deny every local tool, and nothing outside the machine can be pointed there anyway.
        if let Ok(mut denied) = self.denied.write() {
            for net in addresses
                .filter(|a| !a.ip().is_loopback())
                .map(|a| IpNet::from(a.ip()))
            {
                // Denied again on every refresh of the store's nodes: kept once.
                if !denied.contains(&net) {
                    denied.push(net);
                }
            }
        }
        Ok(())
    }

    /// Whether `ip` is outside the networks denied whatever the configuration (link-local
    /// metadata services).
    pub fn allows_always(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        !ALWAYS_DENIED
            .iter()
            .filter_map(|n| n.parse::<IpNet>().ok())
            .any(|net| net.contains(&ip))
    }

    /// Whether `ip` may be connected to.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = unmapped(ip);
        self.denied
            .read()
            .map(|denied| !denied.iter().any(|net| net.contains(&ip)))
            .unwrap_or(false)
    }

    /// Refuses a URL whose host is a denied IP literal (names are checked when resolved).
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
        let literal = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        match literal {
            Some(ip) if !self.allows(ip) => Err(refusal(url, ip)),
            _ => Ok(()),
        }
    }

    /// Refuses a URL whose host is, or now resolves to, a denied address (for clients that do
    /// not resolve through [`EgressGuard::client`], such as the MCP transport's).
    pub async fn check_resolved(&self, url: &str) -> Result<(), String> {
        self.check_url(url)?;
        let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url} is not a URL: {e}"))?;
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            return Ok(());
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(addresses) = tokio::net::lookup_host((host, port)).await {
            for address in addresses {
                if !self.allows(address.ip()) {
                    return Err(refusal(url, address.ip()));
                }
            }
        }
        Ok(())
    }

    /// An HTTP client whose connections go only where this guard allows, following no redirects.
    pub fn client(&self) -> reqwest::Client {
        // Building cannot fail with these settings (missing CA roots are handled in `http`). If
        // it ever did, falling back to a default client would send calls past the guard: stop
        // instead.
        crate::http::client_builder()
            .dns_resolver(Arc::new(GuardedResolver { guard: self.clone() }))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("the egress guard's HTTP client builds (same settings as every other client)")
    }
}

fn refusal(what: &str, ip: IpAddr) -> String {
    format!(
        "{what} leads to {ip}, where the gateway sends nothing (the record store, instance metadata, the gateway's own host or a network the platform denied)"
    )
}

/// Resolves names and keeps only the addresses the guard allows.
#[derive(Debug)]
struct GuardedResolver {
    guard: EgressGuard,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found.iter().copied().filter(|a| guard.allows(a.ip())).collect();
            if allowed.is_empty() {
                let ip = found.first().map(SocketAddr::ip);
                let message = match ip {
                    Some(ip) => refusal(&host, ip),
                    None => format!("{host} resolves to nothing"),
                };
                return Err(message.into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_local_and_listed_networks_are_denied_wherever_they_hide() {
        let guard = EgressGuard::new(vec!["10.96.0.0/12".parse().expect("net")]);
        assert!(!guard.allows("169.254.169.254".parse().expect("ip")));
        assert!(!guard.allows("10.96.0.10".parse().expect("ip")));
        assert!(
            !guard.allows("::ffff:169.254.169.254".parse().expect("ip")),
            "v4-mapped v6"
        );
        assert!(guard.allows("93.184.216.34".parse().expect("ip")));
        assert!(
            guard
                .check_url("http://169.254.169.254/latest/meta-data")
                .is_err()
        );
        assert!(guard.check_url("http://[::ffff:a9fe:a9fe]/").is_err());
        assert!(guard.check_url("http://tools.example.com/x").is_ok());
        // Loopback stays open where nothing asked otherwise (`contextos run`: the user's own
        // tools on their machine).
        assert!(guard.allows("127.0.0.1".parse().expect("ip")));
    }

    #[tokio::test]
    async fn the_gateway_services_own_host_is_denied_in_every_form() {
        let pod_ip: IpAddr = "10.244.0.17".parse().expect("ip");
        let guard = EgressGuard::new(vec![IpNet::from(pod_ip)]).denying_own_host();
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "10.244.0.17",
        ] {
            assert!(!guard.allows(ip.parse().expect("ip")), "{ip} allowed");
        }
        for url in [
            "http://127.0.0.1:9090/metrics",
            "http://[::1]:9090/metrics",
            "http://0.0.0.0:9090/metrics",
            "http://[::ffff:127.0.0.1]:9090/metrics",
            "http://10.244.0.17:9090/metrics",
        ] {
            assert!(guard.check_url(url).is_err(), "{url} allowed");
        }
        // A name that resolves there is refused when resolved.
        assert!(
            guard
                .check_resolved("http://localhost:9090/metrics")
                .await
                .is_err()
        );
        assert!(guard.allows("10.244.0.18".parse().expect("ip")), "another pod");
        assert!(guard.allows("93.184.216.34".parse().expect("ip")));
    }
}
