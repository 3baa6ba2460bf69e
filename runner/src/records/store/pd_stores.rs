//! Where the TiKV nodes behind a PD are, from PD itself: the gateway must never let a tool reach
//! them (a tool pointed at a TiKV node would read and write every tenant's records without a
//! signature). PD's endpoints are known from `--store`; the nodes' addresses are not, so they
//! are asked for with PD's own gRPC API (`GetMembers` for the cluster id, then `GetAllStores`).
//!
//! Only the few fields this needs are declared, with PD's protobuf tags (kvproto `pdpb` and
//! `metapb`): unknown fields are skipped by the decoder.

use std::time::Duration;

use tonic::{codec::ProstCodec, transport::Channel};

/// How long one PD may take to answer.
const PD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, PartialEq, prost::Message)]
struct RequestHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    cluster_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetMembersRequest {
    #[prost(message, optional, tag = "1")]
    header: Option<RequestHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetMembersResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetAllStoresRequest {
    #[prost(message, optional, tag = "1")]
    header: Option<RequestHeader>,
    #[prost(bool, tag = "2")]
    exclude_tombstone_stores: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetAllStoresResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    stores: Vec<Store>,
}

/// `metapb.Store`: the addresses a node serves on.
#[derive(Clone, PartialEq, prost::Message)]
struct Store {
    #[prost(string, tag = "2")]
    address: String,
    #[prost(string, tag = "6")]
    peer_address: String,
    #[prost(string, tag = "7")]
    status_address: String,
}

/// Why the nodes could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("PD at {endpoint}: {detail}")]
pub struct PdError {
    endpoint: String,
    detail: String,
}

/// Every `host:port` the TiKV nodes known to the PD at `endpoint` (`host:port`) serve on:
/// client, peer and status addresses, without repeats.
pub async fn store_addresses(endpoint: &str) -> Result<Vec<String>, PdError> {
    let fail = |detail: String| PdError {
        endpoint: endpoint.to_owned(),
        detail,
    };
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .map_err(|e| fail(format!("not an address: {e}")))?
        .connect_timeout(PD_TIMEOUT)
        .timeout(PD_TIMEOUT)
        .connect()
        .await
        .map_err(|e| fail(format!("cannot connect: {e}")))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let members: GetMembersResponse = call(
        &mut grpc,
        "/pdpb.PD/GetMembers",
        GetMembersRequest { header: None },
    )
    .await
    .map_err(fail)?;
    let cluster_id = members.header.map(|h| h.cluster_id).unwrap_or_default();
    let request = GetAllStoresRequest {
        header: Some(RequestHeader { cluster_id }),
        exclude_tombstone_stores: true,
    };
    let stores: GetAllStoresResponse = call(&mut grpc, "/pdpb.PD/GetAllStores", request)
        .await
        .map_err(fail)?;
    let mut out = Vec::new();
    for store in stores.stores {
        for address in [store.address, store.peer_address, store.status_address] {
            if !address.is_empty() && !out.contains(&address) {
                out.push(address);
            }
        }
    }
    Ok(out)
}

async fn call<Req, Resp>(
    grpc: &mut tonic::client::Grpc<Channel>,
    path: &'static str,
    request: Req,
) -> Result<Resp, String>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let codec: ProstCodec<Req, Resp> = ProstCodec::default();
    grpc.unary(
        tonic::Request::new(request),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
    .map_err(|status| format!("{path}: {}", status.message()))
}
