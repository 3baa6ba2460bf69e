//! Embeddings the service serves runner pods' tool discovery: a pod holds no model, so an Agent
//! that discovers its tools by embeddings asks its gateway, whose model (all-MiniLM-L6-v2 run
//! in the service's process here) scores every turn's tools — and the record says so. What a
//! hostile runner might try instead: embeddings for a run that does not discover by them, more
//! than its discovery needs, oversized requests, no credentials, or an offer it claims was scored
//! by another model.

use std::sync::Arc;

use contextos_runner::discovery::{
    Scoring,
    embedding::{
        Embedder, GATEWAY_BATCH, GATEWAY_EMBEDDINGS_PATH, GatewayEmbedAnswer, GatewayEmbedRequest,
        GatewayEmbeddings, GatewayModel,
    },
    minilm::MiniLm,
    select::{Offer, OfferReason, Selection},
};

use super::*;

#[path = "../support/embedding_model.rs"]
mod embedding_model;

/// A rig whose services embed with the real model.
async fn embedding_rig() -> (Rig, String) {
    let model = MiniLm::load(&embedding_model::model_dir()).expect("the model loads");
    let id = model.id().to_owned();
    let rig = rig_with_options(RigOptions {
        embedder: Some(Embedder::Local(Arc::new(model))),
        ..RigOptions::default()
    })
    .await;
    (rig, id)
}

/// What a runner writing that turn 1 was offered `get_service_status` by `model`'s embeddings
/// is told: why the service refused it.
async fn claim_scored_by(rig: &Rig, client: &GatewayClient, model: &str) -> String {
    let mut recorder = Recorder::resume(client.records(), rig.tenant(), transit(), RUN)
        .await
        .expect("resume");
    recorder.stage(EntryBody::ToolsOffered {
        step: 1,
        scoring: Scoring::Embeddings { model: model.into() },
        selection: Selection {
            offered: vec![Offer {
                tool: "get_service_status".into(),
                score: 0.9,
                reason: OfferReason::Ranked,
            }],
            denied: vec!["delete_namespace".into()],
            over_budget: Vec::new(),
        },
    });
    match recorder.flush().await {
        Ok(_) => panic!("the service wrote an offer scored by {model}"),
        Err(refused) => refused.to_string(),
    }
}

/// The quickstart bundle with `spec.discovery` scoring by embeddings.
fn discovering(bundle: &RunBundle) -> RunBundle {
    let mut bundle = bundle.clone();
    bundle.agent_spec.discovery = Some(
        serde_yaml::from_str("topK: 2\nalwaysOffer: [post_status_update]\nresolver: embeddings\n")
            .expect("discovery"),
    );
    bundle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_pod_scores_its_tools_with_the_services_model() {
    let (rig, model) = embedding_rig().await;
    let bundle = discovering(&rig.bundle);
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    let served = GatewayEmbeddings::ask(client.records())
        .await
        .expect("the service answers")
        .expect("the service has a model");
    let harness = Harness::through_gateway(&client, transit(), bundle, context)
        .expect("harness")
        .with_embedder(Some(Embedder::Gateway(served)));
    let report = harness.start(RUN, TRACE, &mut |_| {}).await.expect("run");
    assert!(
        matches!(report.outcome, RunOutcome::AwaitingApproval(_)),
        "{:?}",
        report.outcome
    );
    let offers: Vec<(Scoring, Selection)> = rig
        .bodies()
        .await
        .into_iter()
        .filter_map(|b| match b {
            EntryBody::ToolsOffered {
                scoring, selection, ..
            } => Some((scoring, selection)),
            _ => None,
        })
        .collect();
    assert!(
        offers.len() >= 3,
        "every turn says what it was offered: {offers:?}"
    );
    for (scoring, selection) in &offers {
        assert_eq!(scoring, &Scoring::Embeddings { model: model.clone() });
        let offered: Vec<&str> = selection.offered.iter().map(|o| o.tool.as_str()).collect();
        assert_eq!(offered.len(), 3, "{offered:?}");
        assert_eq!(offered[0], "post_status_update");
        assert!(!offered.contains(&"delete_namespace"), "{offered:?}");
        assert_eq!(selection.denied, vec!["delete_namespace".to_owned()]);
    }
    // The first turn knows only the incident: it is offered ways to find out why.
    let first: Vec<&str> = offers[0].1.offered.iter().map(|o| o.tool.as_str()).collect();
    assert!(
        first.contains(&"get_service_status") || first.contains(&"search_runbooks"),
        "{first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_go_only_to_a_discovering_run_and_only_as_many_as_it_needs() {
    let (rig, model) = embedding_rig().await;
    let refused = |answer: Result<GatewayEmbedAnswer, contextos_runner::gateway::remote::RemoteError>,
                   expected: &str| match answer {
        Err(contextos_runner::gateway::remote::RemoteError::Refused { code, error, .. }) => {
            assert!(
                code == expected || error.contains(expected),
                "{expected}: {code}: {error}"
            );
        }
        other => panic!("{expected}: answered {other:?}"),
    };
    let texts = |n: usize| GatewayEmbedRequest {
        input: (0..n)
            .map(|i| format!("restart the checkout service ({i})"))
            .collect(),
    };

    // A run whose Agent does not discover its tools by embeddings gets none.
    let context = rig.context(&rig.bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &rig.bundle, &context).await;
    let asked: GatewayModel = client
        .records()
        .get_json(GATEWAY_EMBEDDINGS_PATH)
        .await
        .expect("the model is named to any run");
    assert_eq!(asked.model.as_deref(), Some(model.as_str()));
    refused(
        client
            .records()
            .post_json(GATEWAY_EMBEDDINGS_PATH, &texts(1))
            .await,
        "embeddings_refused",
    );

    // Without a valid token the service answers nothing.
    let stranger = rig.client("no-such-token", &context);
    for answer in [
        stranger
            .records()
            .get_json::<GatewayModel>(GATEWAY_EMBEDDINGS_PATH)
            .await
            .map(|_| ()),
        stranger
            .records()
            .post_json::<_, GatewayEmbedAnswer>(GATEWAY_EMBEDDINGS_PATH, &texts(1))
            .await
            .map(|_| ()),
    ] {
        match answer {
            Err(contextos_runner::gateway::remote::RemoteError::Refused { status, .. }) => {
                assert_eq!(status, 401)
            }
            other => panic!("a stranger was answered {other:?}"),
        }
    }

    // Nor does a run whose Agent does not discover by embeddings get an offer on record that
    // claims it did.
    let refused = claim_scored_by(&rig, &client, &model).await;
    assert!(refused.contains("does not discover"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovering_run_gets_its_catalog_and_an_intent_a_step_and_no_more() {
    let (rig, model) = embedding_rig().await;
    let bundle = discovering(&rig.bundle);
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &bundle, &context).await;
    let post = |request: GatewayEmbedRequest| {
        let records = client.records().clone();
        async move {
            records
                .post_json::<_, GatewayEmbedAnswer>(GATEWAY_EMBEDDINGS_PATH, &request)
                .await
        }
    };
    // Texts never asked for before (each distinct text counts once).
    let fresh = std::sync::atomic::AtomicUsize::new(0);
    let texts = |n: usize, bytes: usize| GatewayEmbedRequest {
        input: (0..n)
            .map(|_| {
                let i = fresh.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("{i} {}", "x".repeat(bytes))
            })
            .collect(),
    };

    let first = texts(2, 10);
    let answer = post(first.clone()).await.expect("embedded");
    assert_eq!(answer.model, model);
    assert_eq!(answer.embeddings.len(), 2);
    assert_eq!(answer.embeddings[0].len(), 384);

    for (case, request) in [
        ("too many texts at once", texts(GATEWAY_BATCH + 1, 10)),
        ("a text too long", texts(1, 20_000)),
        ("nothing to embed", texts(0, 0)),
    ] {
        match post(request).await {
            Err(contextos_runner::gateway::remote::RemoteError::Refused { status, .. }) => {
                assert_eq!(status, 400, "{case}")
            }
            other => panic!("{case}: {other:?}"),
        }
    }

    // What its discovery needs: each tool's texts and one intent a step, twice over.
    let spec = &bundle.agent_spec;
    let catalog: usize = spec.tools.iter().map(|t| 1 + t.examples.len()).sum();
    let allowance = 2 * (catalog + spec.budget.max_steps as usize);
    let mut embedded = 2;
    let refusal = loop {
        match post(texts(GATEWAY_BATCH.min(allowance - embedded).max(1), 10)).await {
            Ok(answer) => embedded += answer.embeddings.len(),
            Err(refusal) => break refusal,
        }
        assert!(embedded <= allowance, "{embedded} embedded, {allowance} allowed");
    };
    assert_eq!(embedded, allowance, "refused only past the allowance");
    assert!(
        refusal
            .to_string()
            .contains(&format!("the {allowance} embeddings")),
        "{refusal}"
    );
    // Asking again for texts the replica still keeps (an attempt that starts again) costs
    // nothing.
    let again = post(first).await.expect("texts the replica still keeps");
    assert_eq!(again.embeddings, answer.embeddings);

    // An offer claimed to be scored by another model is not written.
    let refused = claim_scored_by(&rig, &client, "openai:text-embedding-3-large").await;
    assert!(
        refused.contains(&format!("this gateway serves {model}")),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_model_embeds_nothing_and_takes_no_offer_scored_by_one() {
    let rig = rig().await;
    let bundle = discovering(&rig.bundle);
    let context = rig.context(&bundle, "checkout-5xx-run-1");
    let client = rig.client("token-run-1", &context);
    start_run(client.records(), &bundle, &context).await;
    assert!(
        GatewayEmbeddings::ask(client.records())
            .await
            .expect("the service answers")
            .is_none(),
        "no model to name"
    );
    let request = GatewayEmbedRequest {
        input: vec!["restart the checkout service".into()],
    };
    match client
        .records()
        .post_json::<_, GatewayEmbedAnswer>(GATEWAY_EMBEDDINGS_PATH, &request)
        .await
    {
        Err(contextos_runner::gateway::remote::RemoteError::Refused { code, .. }) => {
            assert_eq!(code, "embeddings_refused")
        }
        other => panic!("{other:?}"),
    }
    let refused = claim_scored_by(&rig, &client, "local:all-minilm-l6-v2/1.19.0-beta29:759c3cd2b7fe").await;
    assert!(refused.contains("BM25 only"), "{refused}");
}
