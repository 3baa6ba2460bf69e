//! Callers whose tokens the API server refuses: a pod sending made-up tokens, in a loop or all
//! at once, has the gateway ask the API server about a bounded number of them (each a TokenReview made with the
//! gateway's identity), a token refused once is refused again without asking, and tokens the
//! replica accepted lately go on passing while that address waits.

use super::*;

/// A service of its own (its allowances are per service), served with each connection's
/// address; its URL and the token double it asks (which counts the reviews).
async fn service() -> (String, StaticTokens) {
    let tokens = StaticTokens::default()
        .with("token-run-1", pod("shop", "checkout-5xx-run-1"))
        .with("token-run-2", pod("shop", "checkout-5xx-run-2"));
    let service = GatewayService::new(
        Arc::new(ScratchStore::default()),
        tokens.clone(),
        StaticTenants::default(),
        TenantKeys::new(&KeyPair::from_seed([12; 32])),
        KeyPair::from_seed([11; 32]).public(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    // The listener `contextos gateway` serves on: it gives each request its caller's address.
    let router = Arc::new(service).router();
    tokio::spawn(async move {
        let _ = contextos_runner::serve::serve(listener, router, Default::default(), std::future::pending())
            .await;
    });
    (url, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_sending_made_up_tokens_costs_the_api_server_a_bounded_number_of_reviews() {
    let (url, tokens) = service().await;
    let http = contextos_runner::http::client();
    let head = |token: String| {
        let request = http
            .get(format!("{url}/v1/run/head?run={RUN}"))
            .bearer_auth(token);
        async move {
            let answer = request.send().await.expect("send");
            let status = answer.status().as_u16();
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            (status, body["code"].as_str().unwrap_or_default().to_owned())
        }
    };
    // A pod's own token, accepted (the request then fails on its missing RunContext).
    let (status, _) = head("token-run-1".into()).await;
    assert!(
        ![401, 429].contains(&status),
        "the pod's token is accepted: {status}"
    );
    let before = tokens.reviews();

    // A hundred at once: a review takes from the address's allowance before it is asked.
    let answers = futures::future::join_all((0..100).map(|n| head(format!("made-up-{n}")))).await;
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for (status, _) in &answers {
        *statuses.entry(*status).or_default() += 1;
    }
    let reviewed = answers
        .iter()
        .position(|(status, _)| *status == 401)
        .expect("some were reviewed");
    assert_eq!(
        tokens.reviews() - before,
        20,
        "only this address's allowance of made-up tokens is reviewed: {statuses:?}"
    );
    assert_eq!(statuses.get(&401), Some(&20), "{statuses:?}");
    assert_eq!(statuses.get(&429), Some(&80), "{statuses:?}");
    let (status, code) = head("made-up-101".into()).await;
    assert_eq!((status, code.as_str()), (429, "throttled"));
    // And says when to ask again, as HTTP does (the allowance refills one a second).
    let throttled = http
        .get(format!("{url}/v1/run/head?run={RUN}"))
        .bearer_auth("made-up-102")
        .send()
        .await
        .expect("send");
    assert_eq!(throttled.status().as_u16(), 429);
    let retry_after = throttled
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        retry_after.is_some_and(|seconds| (1..=30).contains(&seconds)),
        "Retry-After in seconds: {retry_after:?}"
    );

    // Sent again, a refused token is refused without another review.
    let reviews = tokens.reviews();
    assert_eq!(head(format!("made-up-{reviewed}")).await.0, 401);
    assert_eq!(tokens.reviews(), reviews);
    // The token accepted before goes on passing; one never seen waits with the rest.
    let (status, _) = head("token-run-1".into()).await;
    assert!(![401, 429].contains(&status), "accepted lately: {status}");
    assert_eq!(head("token-run-2".into()).await.0, 429);
    // The allowance refills: a second later one more token is reviewed.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (status, _) = head("token-run-2".into()).await;
    assert!(![401, 429].contains(&status), "reviewed again: {status}");
}
