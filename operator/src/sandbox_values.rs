//! What a SandboxProfile asks of the node that its schema cannot check: quantities the API
//! server will take in a pod, and a seccomp profile path the kubelet will load. A value it would
//! refuse is reported on the profile (Ready=False, naming the field), not found later as runner
//! pods the API server keeps refusing.

use contextos_crds::SandboxProfileSpec;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The first value of `spec` a runner pod could not be made with, as a message naming its field.
pub fn problem(spec: &SandboxProfileSpec) -> Option<String> {
    let resources = &spec.resources;
    let quantities = [
        ("spec.resources.cpu", Some(&resources.cpu)),
        ("spec.resources.memory", Some(&resources.memory)),
        (
            "spec.resources.ephemeralStorage",
            resources.ephemeral_storage.as_ref(),
        ),
    ];
    for (field, value) in quantities {
        if let Some(Quantity(text)) = value
            && let Err(why) = positive_quantity(text)
        {
            return Some(format!(
                "{field}: {text:?} {why}; write a positive quantity such as 500m, 1, 512Mi or 1Gi"
            ));
        }
    }
    if let Some(path) = &spec.seccomp_profile.localhost_profile
        && let Err(why) = relative_path(path)
    {
        return Some(format!(
            "spec.seccompProfile.localhostProfile: {path:?} {why}; name the profile's path relative to \
             the kubelet's seccomp directory, e.g. profiles/runner.json"
        ));
    }
    None
}

/// Whether `text` is a Kubernetes quantity above zero: a decimal number (`+` allowed) with one
/// of the suffixes Kubernetes reads (`Ki`…`Ei`, `n`, `u`, `m`, `k`, `M`…`E`) or a decimal
/// exponent (`e3`, `E-2`).
fn positive_quantity(text: &str) -> Result<(), &'static str> {
    let unsigned = text.strip_prefix('+').unwrap_or(text);
    if unsigned.starts_with('-') {
        return Err("is negative");
    }
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return Err("is not a quantity");
    }
    let known_suffix = matches!(
        suffix,
        "" | "n" | "u" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei"
    );
    let exponent = suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    if !known_suffix && !exponent {
        return Err("has a suffix Kubernetes does not read");
    }
    if !number.chars().any(|c| c.is_ascii_digit() && c != '0') {
        return Err("is zero");
    }
    Ok(())
}

/// Whether `path` stays inside the directory it is read relative to.
fn relative_path(path: &str) -> Result<(), &'static str> {
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.split('/').any(|part| part == "..") {
        return Err("leaves the seccomp directory (`..`)");
    }
    if path.split('/').all(|part| part.is_empty() || part == ".") {
        return Err("names no file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_a_pod_takes_pass_and_the_rest_are_named() {
        for good in [
            "500m",
            "1",
            "+2",
            "0.5",
            ".5",
            "512Mi",
            "1Gi",
            "1e3",
            "2E-1",
            "100k",
            "1.5G",
            "250000000n",
        ] {
            assert_eq!(positive_quantity(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("-1", "is negative"),
            ("0", "is zero"),
            ("0Mi", "is zero"),
            ("0.0", "is zero"),
            ("lots", "is not a quantity"),
            ("", "is not a quantity"),
            ("1.2.3", "is not a quantity"),
            ("5MB", "has a suffix Kubernetes does not read"),
            ("1e", "has a suffix Kubernetes does not read"),
            ("1 Gi", "has a suffix Kubernetes does not read"),
        ] {
            assert_eq!(positive_quantity(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn a_seccomp_profile_must_stay_in_the_kubelets_directory() {
        assert_eq!(relative_path("profiles/runner.json"), Ok(()));
        assert_eq!(relative_path("/etc/seccomp/x.json"), Err("is absolute"));
        assert!(relative_path("../../etc/passwd").is_err());
        assert!(relative_path("profiles/../../x").is_err());
        assert!(relative_path("./").is_err());
    }

    #[test]
    fn the_first_bad_value_is_reported_by_its_field() {
        let mut spec: SandboxProfileSpec = serde_json::from_value(serde_json::json!({
            "image": format!("ghcr.io/contextos/runner@sha256:{}", "a".repeat(64)),
            "resources": {"cpu": "500m", "memory": "512Mi"},
        }))
        .expect("spec");
        assert_eq!(problem(&spec), None);
        spec.resources.memory = Quantity("-1".into());
        let message = problem(&spec).expect("refused");
        assert!(
            message.starts_with("spec.resources.memory: \"-1\" is negative"),
            "{message}"
        );
        spec.resources.memory = Quantity("512Mi".into());
        spec.resources.ephemeral_storage = Some(Quantity("lots".into()));
        assert!(problem(&spec).is_some_and(|m| m.starts_with("spec.resources.ephemeralStorage")));
    }
}
