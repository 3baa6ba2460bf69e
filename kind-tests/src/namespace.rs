//! A namespace per test: uniquely named, labelled `contextos.dev/test=<test>`, ready for pods
//! (its `default` ServiceAccount exists), deleted on drop, and reported in full when the test
//! fails.

use std::{
    collections::{BTreeMap, hash_map::RandomState},
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use crate::{
    TestEnv,
    dump::namespace_report,
    wait::{Check, WaitError, wait_for_object},
};
use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Namespace, ServiceAccount},
};
use kube::{
    Api, Resource,
    api::{DeleteParams, ObjectMeta, PostParams},
};

/// Label every test namespace carries, with the test's name as value.
pub const TEST_LABEL: &str = "contextos.dev/test";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A namespace owned by one test.
#[derive(Debug)]
pub struct TestNamespace {
    env: &'static TestEnv,
    name: String,
    passed: AtomicBool,
}

/// The namespace could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("cannot create namespace {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    NotReady(#[from] WaitError),
}

impl TestNamespace {
    /// A fresh namespace for `test`.
    pub async fn new(env: &'static TestEnv, test: &str) -> Result<Self, NamespaceError> {
        Self::with_labels(env, test, &[]).await
    }

    /// A fresh namespace for `test` with extra labels (e.g. Pod Security enforcement).
    pub async fn with_labels(
        env: &'static TestEnv,
        test: &str,
        labels: &[(&str, &str)],
    ) -> Result<Self, NamespaceError> {
        let name = unique_name(test);
        let mut all_labels = BTreeMap::from([(TEST_LABEL.to_owned(), label_value(test))]);
        all_labels.extend(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(all_labels),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<Namespace> = Api::all(env.client());
        api.create(&PostParams::default(), &namespace)
            .await
            .map_err(|source| NamespaceError::Create {
                name: name.clone(),
                source,
            })?;
        let this = Self {
            env,
            name,
            passed: AtomicBool::new(false),
        };
        // Pods are refused until the serviceaccount controller has created `default`.
        let accounts: Api<ServiceAccount> = this.api();
        wait_for_object(
            &accounts,
            "default",
            "created by the serviceaccount controller",
            READY_TIMEOUT,
            |_| Check::Done(()),
        )
        .await?;
        Ok(this)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn env(&self) -> &'static TestEnv {
        self.env
    }

    /// An API for namespaced objects of kind `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.env.client(), &self.name)
    }

    /// Marks the test as passed: on drop the namespace is deleted without a report. A namespace
    /// dropped without `pass()` (an early `?` return, a panic) prints its objects first.
    pub fn pass(&self) {
        self.passed.store(true, Ordering::SeqCst);
    }

    /// Everything of interest in the namespace (what a failed test prints).
    pub async fn report(&self) -> String {
        namespace_report(self.env, &self.name).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let env = self.env;
        let name = self.name.clone();
        if std::thread::panicking() || !self.passed.load(Ordering::SeqCst) {
            let report_name = name.clone();
            let report = env.block_on(Duration::from_secs(30), async move {
                namespace_report(env, &report_name).await
            });
            eprintln!(
                "{}",
                report.unwrap_or_else(|| format!("(no report for namespace {name}: timed out)"))
            );
        }
        let deleted = env.block_on(Duration::from_secs(10), async move {
            Api::<Namespace>::all(env.client())
                .delete(&name, &DeleteParams::background())
                .await
        });
        if let Some(Err(err)) = deleted {
            eprintln!("kind-tests: cannot delete namespace {}: {err}", self.name);
        }
    }
}

/// `<test>-<6 random base-36 characters>`, a valid DNS label.
fn unique_name(test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let mut n = hasher.finish();
    let mut suffix = String::new();
    for _ in 0..6 {
        let digit = u32::try_from(n % 36).unwrap_or(0);
        suffix.push(char::from_digit(digit, 36).unwrap_or('x'));
        n /= 36;
    }
    let mut prefix: String = label_value(test).chars().take(50).collect();
    while prefix.ends_with('-') {
        prefix.pop();
    }
    if prefix.is_empty() {
        format!("kt-{suffix}")
    } else {
        format!("{prefix}-{suffix}")
    }
}

/// Lowercase alphanumerics and dashes, at most 63 characters (valid label value and DNS label).
fn label_value(test: &str) -> String {
    let mapped: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    mapped
        .trim_matches('-')
        .chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_unique() {
        let a = unique_name("Jobs::Complete_and log!");
        let b = unique_name("Jobs::Complete_and log!");
        assert_ne!(a, b);
        assert!(a.starts_with("jobs--complete-and-log-"), "{a}");
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        let long = unique_name(&"x".repeat(200));
        assert!(long.len() <= 63, "{long}");
        assert!(unique_name("---").starts_with("kt-"));
    }
}
