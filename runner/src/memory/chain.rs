//! Append-only record chains in the store, each ending at a signed head: one chain per owner (a
//! subject's consent records, a run's corrections). Each link holds a record, its position and
//! the hash of the link before it; the head — the newest position and hash, signed with the
//! tenant's key — says where the chain ends. Reading a chain verifies both: a record edited
//! (even with every later hash recomputed), removed, reordered, or cut off the end no longer
//! verifies against the head's signature, which only the key's holder (the gateway, or the
//! local data directory's key) can make.
//!
//! Appends are append-only by construction: a link is written only where no link is yet (the
//! write's guard), so two writers racing for the same position cannot both land, and the loser
//! links after the winner. A request sent again (by its request id) finds its own record and is
//! answered with it instead of appending it twice.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    MemoryError,
    backend::{Change, Guard, MemoryBackend, Write},
};
use crate::{
    keys::{KeyPair, PublicKey},
    records::{Hash, StoreError, TenantId, canonical::canonical_bytes_of},
};

/// Times an append is tried when another writer took its position.
const APPEND_ATTEMPTS: usize = 8;
/// The newest links an append looks through for its own request (sent again).
const RECENT: usize = 16;
/// Owners listed per scan.
const LIST_PAGE: usize = 1_000;

/// A kind of chain: its name (in head signatures and errors) and the key letters its links,
/// heads, request ids and owner index live under (`cx/<tenant>/m/<letters>/…`).
#[derive(Clone, Copy, Debug)]
pub struct ChainKind {
    pub name: &'static str,
    pub links: &'static str,
    pub heads: &'static str,
    pub requests: &'static str,
    pub owners: &'static str,
}

/// A record a chain keeps.
pub trait ChainRecord: Serialize + DeserializeOwned + Clone + PartialEq {
    /// Whose chain it belongs to: every link read is checked to be the chain owner's.
    fn owner(&self) -> &str;
    /// The client's id for the request it was made from, if it gave one.
    fn request_id(&self) -> Option<&str>;
    /// Whether `self` is `sent` again: the same record but for when it was recorded.
    fn resent_as(&self, sent: &Self) -> bool;
}

/// One link of a chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link<R> {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// The hash of the link before (none for the first).
    pub prev: Option<Hash>,
    pub record: R,
    /// SHA-256 of the canonical JSON of `seq`, `prev` and `record`.
    pub hash: Hash,
}

impl<R: ChainRecord> Link<R> {
    fn hash_of(seq: u64, prev: Option<&Hash>, record: &R) -> Hash {
        #[derive(Serialize)]
        struct Linked<'a, R> {
            seq: u64,
            prev: Option<&'a Hash>,
            record: &'a R,
        }
        // Plain data with string keys: serialization cannot fail.
        let bytes = canonical_bytes_of(&Linked { seq, prev, record }).unwrap_or_default();
        Hash::of(&bytes)
    }

    fn new(seq: u64, prev: Option<Hash>, record: R) -> Self {
        let hash = Self::hash_of(seq, prev.as_ref(), &record);
        Self {
            seq,
            prev,
            record,
            hash,
        }
    }
}

/// Where a chain ends, signed: the newest link's position and hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash,
    /// Id of the key that signed (see [`PublicKey::key_id`]).
    pub key_id: String,
    /// Ed25519 signature (hex) of [`Head::message`].
    pub signature: String,
}

impl Head {
    /// What the signature covers: the kind, tenant, owner, position and hash, so a head cannot
    /// be moved to another chain, tenant or point in the chain.
    pub fn message(kind: &ChainKind, tenant: &TenantId, owner: &str, seq: u64, hash: &Hash) -> Vec<u8> {
        format!(
            "contextos-{}-head/v1\n{tenant}\n{owner}\n{seq}\n{hash}",
            kind.name
        )
        .into_bytes()
    }

    fn sign<R: ChainRecord>(kind: &ChainKind, tenant: &TenantId, link: &Link<R>, key: &KeyPair) -> Self {
        let message = Self::message(kind, tenant, link.record.owner(), link.seq, &link.hash);
        Self {
            seq: link.seq,
            hash: link.hash,
            key_id: key.key_id(),
            signature: key.sign_hex(&message),
        }
    }
}

/// A chain as read, oldest first, and the head it ends at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "R: DeserializeOwned"))]
pub struct History<R> {
    pub links: Vec<Link<R>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<Head>,
}

impl<R> Default for History<R> {
    fn default() -> Self {
        Self {
            links: Vec::new(),
            head: None,
        }
    }
}

impl<R: ChainRecord> History<R> {
    /// The hash of the newest link: what a decision made under this history names.
    pub fn head_hash(&self) -> Option<Hash> {
        self.links.last().map(|link| link.hash)
    }

    /// Checks that the links are `owner`'s, each hashes to what it holds, positions run 0, 1,
    /// 2… with each naming the hash of the one before, and the chain ends exactly at a head
    /// `key` signed for this kind, tenant and owner.
    pub fn verify(
        &self,
        kind: &ChainKind,
        tenant: &TenantId,
        owner: &str,
        key: &PublicKey,
    ) -> Result<(), String> {
        let mut prev: Option<Hash> = None;
        for (position, link) in self.links.iter().enumerate() {
            if link.record.owner() != owner {
                return Err(format!(
                    "link {} is another {} chain's record",
                    link.seq, kind.name
                ));
            }
            if Link::hash_of(link.seq, link.prev.as_ref(), &link.record) != link.hash {
                return Err(format!("link {} does not hash to the hash it holds", link.seq));
            }
            if link.seq != position as u64 {
                return Err(format!(
                    "link {} is at position {position}: a record was removed or moved",
                    link.seq
                ));
            }
            if link.prev != prev {
                return Err(format!(
                    "link {} does not name the link before it: the history was rewritten",
                    link.seq
                ));
            }
            prev = Some(link.hash);
        }
        self.verify_tip(kind, tenant, owner, key)
    }

    /// Checks that the newest link is the one the head names and the head is signed by `key`
    /// for this kind, tenant and owner (the hashes then vouch for every link before it).
    pub fn verify_tip(
        &self,
        kind: &ChainKind,
        tenant: &TenantId,
        owner: &str,
        key: &PublicKey,
    ) -> Result<(), String> {
        match (&self.head, self.links.last()) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err("the history has no signed head".into()),
            (Some(head), None) => Err(format!(
                "the signed head names record {}, and the history holds none: records were removed",
                head.seq
            )),
            (Some(head), Some(last)) => {
                if (head.seq, head.hash) != (last.seq, last.hash) {
                    return Err(format!(
                        "the history ends at record {} and its signed head names record {}: records were removed or rewritten",
                        last.seq, head.seq
                    ));
                }
                if head.key_id != key.key_id() {
                    return Err(format!(
                        "the head is signed by key {}, not the tenant's key {}",
                        head.key_id,
                        key.key_id()
                    ));
                }
                let message = Head::message(kind, tenant, owner, head.seq, &head.hash);
                if key.verify_hex(&message, &head.signature) {
                    Ok(())
                } else {
                    Err("the head's signature does not verify: the history was rewritten or re-signed".into())
                }
            }
        }
    }
}

/// Whether `stored` answers the request `wanted` came from: the same request id (or, without
/// one, the very same record, time included) — `Err` if the id was used for another record.
fn same_request<R: ChainRecord>(kind: &ChainKind, stored: &R, wanted: &R) -> Result<bool, String> {
    let Some(id) = wanted.request_id() else {
        return Ok(stored == wanted);
    };
    if stored.request_id() != Some(id) {
        return Ok(false);
    }
    if stored.resent_as(wanted) {
        Ok(true)
    } else {
        Err(format!(
            "requestId {id} was used for another {} record (of {}); give each request its own id",
            kind.name,
            stored.owner()
        ))
    }
}

/// One tenant's chains of one kind in `store`.
#[derive(Debug)]
pub struct Chains<'s, S, R> {
    store: &'s S,
    tenant: TenantId,
    kind: ChainKind,
    records: PhantomData<R>,
}

impl<'s, S: MemoryBackend, R: ChainRecord> Chains<'s, S, R> {
    pub fn new(store: &'s S, tenant: &TenantId, kind: ChainKind) -> Self {
        Self {
            store,
            tenant: tenant.clone(),
            kind,
            records: PhantomData,
        }
    }

    fn key(&self, letters: &str, owner: &str) -> Vec<u8> {
        format!("cx/{}/m/{letters}/{owner}", self.tenant).into_bytes()
    }

    /// `cx/<tenant>/m/<links>/<owner>/` then `u64::MAX − seq` (newest first).
    fn chain_prefix(&self, owner: &str) -> Vec<u8> {
        let mut key = self.key(self.kind.links, owner);
        key.push(b'/');
        key
    }

    fn link_key(&self, owner: &str, seq: u64) -> Vec<u8> {
        let mut key = self.chain_prefix(owner);
        key.extend_from_slice(&(u64::MAX - seq).to_be_bytes());
        key
    }

    /// `…/<requests>/<owner>/<sha256 of the request id>` → the position it was appended at.
    fn request_key(&self, owner: &str, request_id: &str) -> Vec<u8> {
        use sha2::Digest as _;
        let mut key = self.key(self.kind.requests, owner);
        key.push(b'/');
        key.extend_from_slice(&sha2::Sha256::digest(request_id.as_bytes()));
        key
    }

    fn owners_prefix(&self) -> Vec<u8> {
        format!("cx/{}/m/{}/", self.tenant, self.kind.owners).into_bytes()
    }

    fn corrupt(&self, owner: &str, problem: impl Into<String>) -> MemoryError {
        MemoryError::Store(StoreError::Corrupt {
            key: format!("cx/{}/m/{}/{owner}", self.tenant, self.kind.links),
            problem: problem.into(),
        })
    }

    /// Appends `record` to its owner's chain, signs the new head with `key` and returns the new
    /// link — or the link of the same request appended before. `room` says whether a record may
    /// go at a position (a chain's bound).
    pub async fn append(
        &self,
        record: R,
        key: &KeyPair,
        room: impl Fn(u64) -> Result<(), MemoryError>,
        refused: impl Fn(String) -> MemoryError,
    ) -> Result<Link<R>, MemoryError> {
        let owner = record.owner().to_owned();
        // A request with an id is found wherever it landed in the chain, not only among the
        // newest links: sent again much later, it is never appended twice.
        let request_key = record.request_id().map(|id| self.request_key(&owner, id));
        if let Some(request_key) = &request_key
            && let Some(link) = self.requested(&owner, request_key).await?
            && same_request(&self.kind, &link.record, &record).map_err(&refused)?
        {
            return Ok(link);
        }
        for _ in 0..APPEND_ATTEMPTS {
            // The chain is extended only from a newest link its signed head vouches for (and so
            // for every link before it, through the hashes): a forged history is never signed
            // with the tenant's key by an append on top of it.
            let recent = self
                .read_verified(&owner, RECENT, |links, head| {
                    let tip = History {
                        links: links.last().cloned().into_iter().collect(),
                        head: head.clone(),
                    };
                    tip.verify_tip(&self.kind, &self.tenant, &owner, &key.public())
                })
                .await?;
            let recent: Vec<Link<R>> = recent.links.into_iter().rev().collect();
            for link in &recent {
                if same_request(&self.kind, &link.record, &record).map_err(&refused)? {
                    return Ok(link.clone());
                }
            }
            let newest = recent.first();
            let seq = match newest {
                None => 0,
                Some(link) => link.seq.checked_add(1).ok_or_else(|| {
                    self.corrupt(&owner, "the newest link is at the last position there is")
                })?,
            };
            room(seq)?;
            let link = Link::new(seq, newest.map(|link| link.hash), record.clone());
            let head = Head::sign(&self.kind, &self.tenant, &link, key);
            let link_key = self.link_key(&owner, seq);
            let mut owner_key = self.owners_prefix();
            owner_key.extend_from_slice(owner.as_bytes());
            // Plain data with string keys: serialization cannot fail.
            let write = Write {
                guard: Guard::Absent(link_key.clone()),
                changes: vec![
                    Change::Put(link_key, serde_json::to_vec(&link).unwrap_or_default()),
                    Change::Put(
                        self.key(self.kind.heads, &owner),
                        serde_json::to_vec(&head).unwrap_or_default(),
                    ),
                    Change::Put(owner_key, b"1".to_vec()),
                ]
                .into_iter()
                .chain(
                    request_key
                        .clone()
                        .map(|request| Change::Put(request, seq.to_be_bytes().to_vec())),
                )
                .collect(),
            };
            if self.store.memory_write(&self.tenant, vec![write]).await?.first() == Some(&true) {
                return Ok(link);
            }
            // Another writer took this position (or this very request did, its answer lost):
            // look again.
        }
        Err(MemoryError::Store(StoreError::Backend(format!(
            "{} records of {owner} were appended by others {APPEND_ATTEMPTS} times while this one was; try again",
            self.kind.name
        ))))
    }

    /// The link a request id was appended as, if it was.
    async fn requested(&self, owner: &str, request_key: &[u8]) -> Result<Option<Link<R>>, MemoryError> {
        let Some(seq) = self
            .store
            .memory_get(&self.tenant, vec![request_key.to_vec()])
            .await?
            .pop()
            .flatten()
        else {
            return Ok(None);
        };
        let seq = <[u8; 8]>::try_from(seq.as_slice())
            .map(u64::from_be_bytes)
            .map_err(|_| self.corrupt(owner, "a request's position is not 8 bytes"))?;
        let link_key = self.link_key(owner, seq);
        let value = self
            .store
            .memory_get(&self.tenant, vec![link_key.clone()])
            .await?
            .pop()
            .flatten()
            .ok_or_else(|| self.corrupt(owner, format!("a request names link {seq}, which is not there")))?;
        self.decode(owner, &link_key, &value).map(Some)
    }

    fn decode(&self, owner: &str, key: &[u8], value: &[u8]) -> Result<Link<R>, MemoryError> {
        let link: Link<R> = serde_json::from_slice(value).map_err(|e| self.corrupt(owner, e.to_string()))?;
        let prefix = self.chain_prefix(owner);
        let seq = key
            .get(prefix.len()..)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(|bytes| u64::MAX - u64::from_be_bytes(bytes));
        if seq != Some(link.seq) {
            return Err(self.corrupt(owner, format!("link {} is kept at another position", link.seq)));
        }
        if Link::hash_of(link.seq, link.prev.as_ref(), &link.record) != link.hash {
            return Err(self.corrupt(
                owner,
                format!("link {} does not hash to the hash it holds", link.seq),
            ));
        }
        if link.record.owner() != owner {
            return Err(self.corrupt(
                owner,
                format!("link {} is another {} chain's record", link.seq, self.kind.name),
            ));
        }
        Ok(link)
    }

    /// `owner`'s whole chain (at most `limit` links), oldest first, verified against `key`.
    /// Anything else is reported as corrupt.
    pub async fn history(
        &self,
        owner: &str,
        key: &PublicKey,
        limit: usize,
    ) -> Result<History<R>, MemoryError> {
        self.read_verified(owner, limit, |links, head| {
            let history = History {
                links: links.to_vec(),
                head: head.clone(),
            };
            history.verify(&self.kind, &self.tenant, owner, key)
        })
        .await
    }

    /// The newest `count` links (oldest first) and the head, read from one snapshot, once
    /// `check` passes on them; what fails it is corrupt.
    async fn read_verified(
        &self,
        owner: &str,
        count: usize,
        check: impl Fn(&[Link<R>], &Option<Head>) -> Result<(), String>,
    ) -> Result<History<R>, MemoryError> {
        let prefix = self.chain_prefix(owner);
        let end = super::keys::prefix_end(&prefix);
        let (mut values, pairs) = self
            .store
            .memory_snapshot(
                &self.tenant,
                vec![self.key(self.kind.heads, owner)],
                prefix,
                end,
                count,
            )
            .await?;
        let mut links = pairs
            .iter()
            .map(|(key, value)| self.decode(owner, key, value))
            .collect::<Result<Vec<_>, _>>()?;
        links.reverse();
        let head = match values.pop().flatten() {
            Some(bytes) => Some(
                serde_json::from_slice::<Head>(&bytes)
                    .map_err(|e| self.corrupt(owner, format!("the signed head: {e}")))?,
            ),
            None => None,
        };
        check(&links, &head).map_err(|problem| self.corrupt(owner, problem))?;
        Ok(History { links, head })
    }

    /// The owners that have a chain, in order, at most `limit`.
    pub async fn owners(&self, limit: usize) -> Result<Vec<String>, MemoryError> {
        let prefix = self.owners_prefix();
        let end = super::keys::prefix_end(&prefix);
        let mut start = prefix.clone();
        let mut out = Vec::new();
        while out.len() < limit {
            let want = LIST_PAGE.min(limit - out.len());
            let page = self
                .store
                .memory_scan(&self.tenant, start, end.clone(), want)
                .await?;
            out.extend(
                page.iter()
                    .map(|(key, _)| String::from_utf8_lossy(&key[prefix.len()..]).into_owned()),
            );
            match page.last() {
                Some((last, _)) if page.len() == want => start = super::keys::after(last),
                _ => break,
            }
        }
        Ok(out)
    }
}
