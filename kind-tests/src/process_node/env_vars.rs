//! A container's environment, resolved the way the kubelet does: `envFrom`, then `env` in order
//! (literal values with `$(VAR)` expansion, ConfigMap and Secret keys, downward-API fields).
//! Pure: the ConfigMaps and Secrets come in through [`Lookups`].

use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVarSource};

use super::plan::{ConfigError, Lookups, PodFacts};

/// Ordered environment: later definitions of a name replace earlier ones in place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    vars: Vec<(String, String)>,
}

impl Environment {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, name: &str, value: String) {
        match self.vars.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name.to_owned(), value)),
        }
    }

    pub fn vars(&self) -> &[(String, String)] {
        &self.vars
    }

    /// Expands `$(NAME)` references with this environment (kubelet rules).
    pub fn expand(&self, input: &str) -> String {
        expand(input, |name| self.get(name).map(str::to_owned))
    }
}

/// The environment of `container` in the pod described by `facts`.
pub fn resolve_env(
    container: &Container,
    facts: &PodFacts,
    lookups: &Lookups,
) -> Result<Environment, ConfigError> {
    let mut env = Environment::default();
    for source in container.env_from.iter().flatten() {
        env_from(source, facts, lookups, &mut env)?;
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value_from, &var.value) {
            (Some(from), _) => value_from(&var.name, from, facts, lookups)?,
            (None, value) => Some(env.expand(value.as_deref().unwrap_or_default())),
        };
        if let Some(value) = value {
            env.set(&var.name, value);
        }
    }
    Ok(env)
}

fn env_from(
    source: &EnvFromSource,
    facts: &PodFacts,
    lookups: &Lookups,
    env: &mut Environment,
) -> Result<(), ConfigError> {
    let prefix = source.prefix.as_deref().unwrap_or_default();
    if let Some(cm) = &source.config_map_ref {
        match lookups.configmaps.get(&cm.name) {
            Some(found) => {
                for (key, value) in found.data.iter().flatten() {
                    env.set(&format!("{prefix}{key}"), value.clone());
                }
            }
            None if cm.optional == Some(true) => {}
            None => return Err(missing("configmap", facts, &cm.name)),
        }
    }
    if let Some(secret) = &source.secret_ref {
        match lookups.secrets.get(&secret.name) {
            Some(found) => {
                for (key, value) in found.data.iter().flatten() {
                    env.set(
                        &format!("{prefix}{key}"),
                        String::from_utf8_lossy(&value.0).into_owned(),
                    );
                }
            }
            None if secret.optional == Some(true) => {}
            None => return Err(missing("secret", facts, &secret.name)),
        }
    }
    Ok(())
}

/// `Ok(None)`: an optional reference that does not resolve, so the variable is left out.
fn value_from(
    name: &str,
    from: &EnvVarSource,
    facts: &PodFacts,
    lookups: &Lookups,
) -> Result<Option<String>, ConfigError> {
    if let Some(field) = &from.field_ref {
        return field_value(facts, &field.field_path).map(Some);
    }
    if let Some(key_ref) = &from.config_map_key_ref {
        let optional = key_ref.optional == Some(true);
        let Some(cm) = lookups.configmaps.get(&key_ref.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(missing("configmap", facts, &key_ref.name))
            };
        };
        return match cm.data.as_ref().and_then(|d| d.get(&key_ref.key)) {
            Some(value) => Ok(Some(value.clone())),
            None if optional => Ok(None),
            None => Err(missing_key("ConfigMap", facts, &key_ref.name, &key_ref.key)),
        };
    }
    if let Some(key_ref) = &from.secret_key_ref {
        let optional = key_ref.optional == Some(true);
        let Some(secret) = lookups.secrets.get(&key_ref.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(missing("secret", facts, &key_ref.name))
            };
        };
        return match secret.data.as_ref().and_then(|d| d.get(&key_ref.key)) {
            Some(value) => Ok(Some(String::from_utf8_lossy(&value.0).into_owned())),
            None if optional => Ok(None),
            None => Err(missing_key("Secret", facts, &key_ref.name, &key_ref.key)),
        };
    }
    let what = if from.resource_field_ref.is_some() {
        "resourceFieldRef"
    } else if from.file_key_ref.is_some() {
        "fileKeyRef"
    } else {
        "an empty valueFrom"
    };
    Err(ConfigError::Unsupported(format!(
        "env var {name:?} uses {what}, which the process node does not support; use value, fieldRef, \
         configMapKeyRef or secretKeyRef"
    )))
}

fn missing(kind: &str, facts: &PodFacts, name: &str) -> ConfigError {
    ConfigError::Waiting(format!(
        "{kind} \"{name}\" not found in namespace \"{}\"",
        facts.namespace()
    ))
}

fn missing_key(kind: &str, facts: &PodFacts, name: &str, key: &str) -> ConfigError {
    ConfigError::Waiting(format!(
        "couldn't find key {key} in {kind} {}/{name}",
        facts.namespace()
    ))
}

/// The value of a downward-API field path (`metadata.name`, `metadata.labels['app']`,
/// `spec.nodeName`, `status.podIP`, ...). Whole `metadata.labels`/`metadata.annotations` render as
/// `key="value"` lines, the format of downward-API volume files.
pub fn field_value(facts: &PodFacts, path: &str) -> Result<String, ConfigError> {
    let meta = &facts.pod.metadata;
    let spec = facts.pod.spec.as_ref();
    if let Some((map, key)) = subscript(path) {
        let values = if map == "metadata.labels" {
            &meta.labels
        } else {
            &meta.annotations
        };
        return Ok(values
            .as_ref()
            .and_then(|v| v.get(key))
            .cloned()
            .unwrap_or_default());
    }
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => facts.namespace().to_owned(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => render_map(meta.labels.iter().flatten()),
        "metadata.annotations" => render_map(meta.annotations.iter().flatten()),
        "spec.nodeName" => facts.node_name.to_owned(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => facts.pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.to_owned(),
        other => {
            return Err(ConfigError::Unsupported(format!(
                "fieldRef {other:?} is not supported by the process node; supported: metadata.name, \
                 metadata.namespace, metadata.uid, metadata.labels['<key>'], metadata.annotations['<key>'], \
                 spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP"
            )));
        }
    };
    Ok(value)
}

/// `metadata.labels['a.b/c']` → `("metadata.labels", "a.b/c")`.
fn subscript(path: &str) -> Option<(&str, &str)> {
    let (map, rest) = path.split_once("['")?;
    let key = rest.strip_suffix("']")?;
    matches!(map, "metadata.labels" | "metadata.annotations").then_some((map, key))
}

fn render_map<'a>(entries: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let mut out = String::new();
    for (key, value) in entries {
        out.push_str(key);
        out.push_str("=\"");
        for c in value.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push_str("\"\n");
    }
    out
}

/// Kubelet `$(VAR)` expansion: a defined `$(NAME)` is replaced, an undefined one stays as written,
/// `$$` is a literal `$`, and a `$(` without `)` is literal.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let chars: Vec<char> = input.chars().collect();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' || i + 1 == chars.len() {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars[i + 1] {
            '$' => {
                out.push('$');
                i += 2;
            }
            '(' => match chars[i + 2..].iter().position(|c| *c == ')') {
                Some(len) => {
                    let name: String = chars[i + 2..i + 2 + len].iter().collect();
                    match lookup(&name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(&name);
                            out.push(')');
                        }
                    }
                    i += len + 3;
                }
                None => {
                    out.push_str("$(");
                    i += 2;
                }
            },
            other => {
                out.push('$');
                out.push(other);
                i += 2;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        ByteString,
        api::core::v1::{
            ConfigMap, ConfigMapEnvSource, ConfigMapKeySelector, EnvVar, ObjectFieldSelector, Pod, PodSpec,
            Secret, SecretEnvSource, SecretKeySelector,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("team-a".into()),
                uid: Some("uid-1".into()),
                labels: Some(BTreeMap::from([("app".into(), "web".into())])),
                annotations: Some(BTreeMap::from([("note".into(), "say \"hi\"".into())])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                service_account_name: Some("runner".into()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn facts(pod: &Pod) -> PodFacts<'_> {
        PodFacts {
            pod,
            node_name: "node-1",
            pod_ip: "127.0.0.1",
            host_ip: "127.0.0.1",
        }
    }

    fn lookups() -> Lookups {
        let mut lookups = Lookups::default();
        lookups.configmaps.insert(
            "settings".into(),
            ConfigMap {
                data: Some(BTreeMap::from([
                    ("MODE".into(), "fast".into()),
                    ("LEVEL".into(), "3".into()),
                ])),
                ..Default::default()
            },
        );
        lookups.secrets.insert(
            "creds".into(),
            Secret {
                data: Some(BTreeMap::from([("TOKEN".into(), ByteString(b"s3cret".to_vec()))])),
                ..Default::default()
            },
        );
        lookups
    }

    fn literal(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    fn field(path: &str) -> EnvVarSource {
        EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: path.into(),
            }),
            ..Default::default()
        }
    }

    fn cm_key(name: &str, key: &str, optional: Option<bool>) -> EnvVarSource {
        EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: name.into(),
                key: key.into(),
                optional,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn resolves_every_source_in_kubelet_order() {
        let pod = pod();
        let container = Container {
            env_from: Some(vec![
                EnvFromSource {
                    config_map_ref: Some(ConfigMapEnvSource {
                        name: "settings".into(),
                        optional: None,
                    }),
                    prefix: Some("CFG_".into()),
                    secret_ref: None,
                },
                EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: "creds".into(),
                        optional: None,
                    }),
                    ..Default::default()
                },
            ]),
            env: Some(vec![
                literal("GREETING", "hello $(POD) $(CFG_MODE) $$(CFG_MODE) $(NOPE)"),
                from("POD", field("metadata.name")),
                literal("LATE", "$(POD)"),
                from("APP", field("metadata.labels['app']")),
                from("MISSING_LABEL", field("metadata.labels['zzz']")),
                from("NOTE", field("metadata.annotations['note']")),
                from("NS", field("metadata.namespace")),
                from("UID", field("metadata.uid")),
                from("NODE", field("spec.nodeName")),
                from("SA", field("spec.serviceAccountName")),
                from("IP", field("status.podIP")),
                from("HOST", field("status.hostIP")),
                from("LEVEL", cm_key("settings", "LEVEL", None)),
                from(
                    "SECRET",
                    EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "creds".into(),
                            key: "TOKEN".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    },
                ),
                from("OPTIONAL", cm_key("absent", "x", Some(true))),
                from("OPTIONAL_KEY", cm_key("settings", "absent", Some(true))),
                literal("CFG_MODE", "overridden"),
            ]),
            ..Default::default()
        };
        let env = resolve_env(&container, &facts(&pod), &lookups()).expect("resolves");
        let get = |name| env.get(name).map(str::to_owned);
        // POD is defined after GREETING, so it is not expanded there (kubelet rule).
        assert_eq!(
            get("GREETING").as_deref(),
            Some("hello $(POD) fast $(CFG_MODE) $(NOPE)")
        );
        assert_eq!(get("LATE").as_deref(), Some("web-0"));
        assert_eq!(get("APP").as_deref(), Some("web"));
        assert_eq!(get("MISSING_LABEL").as_deref(), Some(""));
        assert_eq!(get("NOTE").as_deref(), Some("say \"hi\""));
        assert_eq!(get("NS").as_deref(), Some("team-a"));
        assert_eq!(get("UID").as_deref(), Some("uid-1"));
        assert_eq!(get("NODE").as_deref(), Some("node-1"));
        assert_eq!(get("SA").as_deref(), Some("runner"));
        assert_eq!(get("IP").as_deref(), Some("127.0.0.1"));
        assert_eq!(get("HOST").as_deref(), Some("127.0.0.1"));
        assert_eq!(get("LEVEL").as_deref(), Some("3"));
        assert_eq!(get("CFG_LEVEL").as_deref(), Some("3"));
        assert_eq!(get("TOKEN").as_deref(), Some("s3cret"));
        assert_eq!(get("SECRET").as_deref(), Some("s3cret"));
        assert_eq!(get("CFG_MODE").as_deref(), Some("overridden"));
        assert_eq!(get("OPTIONAL"), None);
        assert_eq!(get("OPTIONAL_KEY"), None);
        // Overriding keeps the first position.
        assert_eq!(env.vars()[0].0, "CFG_LEVEL");
    }

    #[test]
    fn missing_required_references_are_retryable() {
        let pod = pod();
        for source in [
            cm_key("absent", "x", None),
            cm_key("settings", "absent", Some(false)),
        ] {
            let container = Container {
                env: Some(vec![from("X", source)]),
                ..Default::default()
            };
            let err = resolve_env(&container, &facts(&pod), &lookups()).expect_err("missing");
            assert!(matches!(err, ConfigError::Waiting(_)), "{err:?}");
        }
        let container = Container {
            env_from: Some(vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: "nope".into(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let err = resolve_env(&container, &facts(&pod), &lookups()).expect_err("missing secret");
        assert_eq!(
            err,
            ConfigError::Waiting("secret \"nope\" not found in namespace \"team-a\"".into())
        );
    }

    #[test]
    fn unsupported_fields_say_what_is_supported() {
        let pod = pod();
        let container = Container {
            env: Some(vec![from("X", field("spec.hostname"))]),
            ..Default::default()
        };
        let err = resolve_env(&container, &facts(&pod), &lookups()).expect_err("unsupported");
        let ConfigError::Unsupported(text) = err else {
            panic!("not unsupported: {err:?}")
        };
        assert!(
            text.contains("spec.hostname") && text.contains("metadata.labels['<key>']"),
            "{text}"
        );
        let empty = Container {
            env: Some(vec![from("Y", EnvVarSource::default())]),
            ..Default::default()
        };
        assert!(matches!(
            resolve_env(&empty, &facts(&pod), &lookups()),
            Err(ConfigError::Unsupported(_))
        ));
    }

    #[test]
    fn whole_maps_render_as_volume_files() {
        let pod = pod();
        assert_eq!(
            field_value(&facts(&pod), "metadata.annotations").expect("renders"),
            "note=\"say \\\"hi\\\"\"\n"
        );
        assert_eq!(
            field_value(&facts(&pod), "metadata.labels").expect("renders"),
            "app=\"web\"\n"
        );
    }

    #[test]
    fn expansion_edge_cases() {
        let lookup = |name: &str| (name == "A").then(|| "1".to_owned());
        assert_eq!(expand("$(A)$(A)", lookup), "11");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("$(A", lookup), "$(A");
        assert_eq!(expand("cost: $5 $", lookup), "cost: $5 $");
        assert_eq!(expand("ü$(A)ü", lookup), "ü1ü");
        assert_eq!(expand("$()", lookup), "$()");
    }
}
