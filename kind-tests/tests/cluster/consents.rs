//! Consent objects against the real API server, chained by the gateway's chainer (in this
//! process, over an in-memory store): each is appended to its subject's history once — also
//! when a second replica chains alongside — in the order the API server accepted them even when
//! it lists them by name, and says so on its status; its spec cannot be edited afterwards.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use contextos_crds::{
    Consent,
    consent::{ConsentAction, ConsentCategory, ConsentSpec},
};
use contextos_kind_tests::{TestEnv, TestNamespace};
use contextos_runner::{
    consent::{Purpose, SubjectHandle},
    gateway::consent_objects::chain_consent_objects,
    keys::{KeyPair, TenantKeys},
    memory::consents::ConsentBook,
    personal_data::Category,
    records::{TenantId, recorder::now_ms, store::scratch::ScratchStore},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};

fn consent(name: &str, action: ConsentAction, categories: &[&str]) -> Consent {
    Consent::new(
        name,
        ConsentSpec {
            subject: "cust-7f3a9c".into(),
            purpose: "support-history".into(),
            action,
            categories: categories.iter().map(|c| ConsentCategory((*c).into())).collect(),
            evidence: Some("signed form SUP-88".into()),
            expires_at: None,
            recorded_by: "priya@example.com".into(),
        },
    )
}

/// Waits until `name` says it is recorded; its link's position.
async fn recorded(api: &Api<Consent>, name: &str) -> Result<u64> {
    for _ in 0..150 {
        let live = api.get(name).await?;
        if let Some(status) = &live.status
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Recorded" && c.status == "True")
            && let Some(link) = &status.link
        {
            return Ok(link.seq);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("Consent {name} was not recorded within 30 s")
}

#[tokio::test]
async fn consent_objects_are_chained_once_in_the_order_they_were_accepted() -> Result<()> {
    let env = TestEnv::shared().await?;
    let ns = TestNamespace::new(env, "consents").await?;
    let client = env.client();
    let api = Api::<Consent>::namespaced(client.clone(), ns.name());
    let post = PostParams::default();
    // Both exist before the chainer starts; the revocation is the newer, and first by name.
    api.create(
        &post,
        &consent("b-grant", ConsentAction::Grant, &["email", "phone"]),
    )
    .await
    .context("create the grant")?;
    // Creation times are kept to the second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.create(
        &post,
        &consent("a-revoke-phone", ConsentAction::Revoke, &["phone"]),
    )
    .await
    .context("create the revocation")?;

    let store = Arc::new(ScratchStore::default());
    let keys = TenantKeys::new(&KeyPair::from_seed([5; 32]));
    let chainer = tokio::spawn(chain_consent_objects(client.clone(), store.clone(), keys.clone()));
    let grant = recorded(&api, "b-grant").await?;
    let revocation = recorded(&api, "a-revoke-phone").await?;
    ensure!(
        (grant, revocation) == (0, 1),
        "chained as links {grant} and {revocation}: the grant must come first"
    );

    // One applied while it runs is chained next; a second replica chains nothing again.
    let replica = tokio::spawn(chain_consent_objects(client.clone(), store.clone(), keys.clone()));
    api.create(&post, &consent("c-grant-phone", ConsentAction::Grant, &["phone"]))
        .await
        .context("create the second grant")?;
    ensure!(recorded(&api, "c-grant-phone").await? == 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tenant = TenantId::new(ns.name().to_owned())?;
    let subject = SubjectHandle::new("cust-7f3a9c")?;
    let history = ConsentBook::new(&*store, &tenant)
        .history(&subject, &keys.for_tenant(ns.name()).public())
        .await?;
    ensure!(
        history.links.len() == 3,
        "{} links: each object is chained once",
        history.links.len()
    );
    ensure!(
        history.links.iter().all(|l| l.record.by == "priya@example.com"),
        "the history names who recorded each"
    );
    let in_force = history
        .ledger()
        .in_force(&subject, &Purpose::new("support-history")?, now_ms());
    ensure!(
        in_force == [Category::Email, Category::Phone].into_iter().collect(),
        "in force after grant, revoke phone, grant phone: {in_force:?}"
    );

    // A record of what the person decided then: editing it is refused.
    let edit = serde_json::json!({"spec": {"categories": ["email", "iban"]}});
    let refused = api
        .patch("b-grant", &PatchParams::default(), &Patch::Merge(&edit))
        .await;
    ensure!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.message.contains("a Consent cannot change")),
        "an edit of a Consent was not refused as one: {refused:?}"
    );
    chainer.abort();
    replica.abort();
    ns.pass();
    Ok(())
}
