//! The audit's rules: each a documented [`Rule`] and a pure check over the [`Harness`]. The
//! catalogue is the one list the audit runs, `contextos audit --rules` prints and the README's
//! rule table is generated from.

mod agent;
pub mod install;
mod live;
mod ontology;
mod openapi;
mod policy;
mod records;
mod sandbox;
mod schema;
mod session;
mod spend;
mod tool;

use super::{
    field::FieldPath,
    finding::{Finding, Rule},
    harness::{Harness, Object, ObjectRef},
    source::Document,
};

/// A rule's check: reports what it finds into the sink.
pub type Check = fn(&Harness, &mut Sink<'_>);

/// Every rule, grouped by the kind of object it looks at.
pub fn catalogue() -> impl Iterator<Item = &'static (Rule, Check)> {
    [
        schema::RULES,
        agent::RULES,
        ontology::RULES,
        tool::RULES,
        policy::RULES,
        sandbox::RULES,
        session::RULES,
        spend::RULES,
        install::RULES,
        records::RULES,
        live::RULES,
        openapi::RULES,
    ]
    .into_iter()
    .flatten()
}

/// Runs every rule over `harness`.
pub fn run(harness: &Harness) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (rule, check) in catalogue() {
        let mut sink = Sink {
            rule,
            findings: Vec::new(),
        };
        check(harness, &mut sink);
        findings.append(&mut sink.findings);
    }
    findings
}

/// The findings `rules` make about `harness`, as (rule id, message): for the rules' own tests.
#[cfg(test)]
pub(crate) fn findings_of(rules: &[(Rule, Check)], harness: &Harness) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (rule, check) in rules {
        let mut sink = Sink {
            rule,
            findings: Vec::new(),
        };
        check(harness, &mut sink);
        out.extend(
            sink.findings
                .into_iter()
                .map(|f| (f.rule.0.to_owned(), f.message)),
        );
    }
    out
}

/// Where one rule's findings go.
#[derive(Debug)]
pub struct Sink<'r> {
    rule: &'r Rule,
    findings: Vec<Finding>,
}

impl Sink<'_> {
    /// Reports `message` about `field` of `object`.
    pub fn report<T>(&mut self, object: &Object<T>, field: FieldPath, message: impl Into<String>) {
        let (id, doc, field) = object.declared_at(field);
        self.report_at(id, doc, field, message);
    }

    /// Reports `message` about `field` of the object `id`, read from `doc` (which places it).
    pub fn report_at(
        &mut self,
        id: &ObjectRef,
        doc: &Document,
        field: FieldPath,
        message: impl Into<String>,
    ) {
        let placed = !doc.file.as_os_str().is_empty();
        self.findings.push(Finding {
            rule: self.rule.id,
            severity: self.rule.severity,
            object: id.clone(),
            line: doc.line_of(&field),
            file: placed.then(|| doc.file.clone()),
            field,
            message: message.into(),
        });
    }
}

/// `spec.<keys…>`.
pub(crate) fn spec(keys: &[&str]) -> FieldPath {
    let mut path = FieldPath::of(&["spec"]);
    for key in keys {
        path = path.key(key);
    }
    path
}

/// Whether `url` talks plain HTTP to something other than this machine or the cluster's own
/// Services (`*.svc`, `*.cluster.local`), i.e. across a network someone else may watch.
pub(crate) fn plain_http_off_cluster(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    if parsed.scheme() != "http" {
        return false;
    }
    let host = parsed.host_str().unwrap_or_default();
    let local = host == "localhost"
        || host.ends_with(".svc")
        || host.ends_with(".svc.cluster.local")
        || host.ends_with(".cluster.local")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    !local
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn rule_ids_are_unique_and_documented() {
        let mut ids = BTreeSet::new();
        for (rule, _) in catalogue() {
            assert!(ids.insert(rule.id), "{} twice", rule.id);
            assert!(
                rule.id
                    .0
                    .split_once('/')
                    .is_some_and(|(group, name)| !group.is_empty() && !name.is_empty()),
                "{} is not <group>/<name>",
                rule.id
            );
            for text in [rule.title, rule.why, rule.fix] {
                assert!(!text.is_empty() && !text.ends_with(' '), "{}: {text:?}", rule.id);
            }
        }
        assert!(ids.len() >= 30, "{} rules", ids.len());
    }

    #[test]
    fn plain_http_is_judged_by_where_it_goes() {
        assert!(plain_http_off_cluster("http://api.example.com/v1"));
        assert!(plain_http_off_cluster("http://10.1.2.3:8080/x"));
        assert!(!plain_http_off_cluster("https://api.example.com/v1"));
        assert!(!plain_http_off_cluster("http://ops-tools.shop.svc:8080/x"));
        assert!(!plain_http_off_cluster("http://ops.shop.svc.cluster.local/x"));
        assert!(!plain_http_off_cluster("http://127.0.0.1:9/v1"));
    }
}
