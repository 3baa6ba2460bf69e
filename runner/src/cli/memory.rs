//! `contextos memory list|forget|held|approve|reject`: a tenant's memory items in its store —
//! listed by scope, type and words, newest first, and forgotten one by one or a whole scope at
//! once (a subject's memory, when they ask for it) — and the candidates held for a person's
//! review, approved (kept, if consent covers them then) or rejected.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use contextos_runner::{
    memory::{
        ItemId, ItemScope, MAX_RECALL_ITEMS, RecallQuery,
        bank::MemoryBank,
        held::HeldCandidates,
        remote::{HeldListed, Listed, RemoteMemory, parse_type, type_name},
    },
    ontology::EntityTypeName,
    records::{AnyStore, Hash, recorder::now_ms},
    text::for_terminal,
};

use super::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum MemoryCommand {
    /// List a scope's items, newest first (consented or not: what an agent could be offered
    /// is decided at recall).
    List {
        /// agent:<name>, subject:<handle> or tenant.
        #[arg(long)]
        scope: String,
        /// Only items of this type: fact, preference, procedure or episode.
        #[arg(long = "type")]
        memory_type: Option<String>,
        /// Only items holding every one of these words.
        #[arg(long, default_value = "")]
        query: String,
        /// At most this many items (1–100).
        #[arg(long, default_value_t = 20)]
        max: usize,
        /// Only items about an entity of this type of the tenant's Ontology (e.g. incident).
        #[arg(long)]
        entity_type: Option<String>,
    },
    /// List the candidates held for review (an Agent with `review: required` or `withoutConsent:
    /// hold`), with why each is held.
    Held {
        /// Only this scope's: agent:<name>, subject:<handle> or tenant.
        #[arg(long)]
        scope: Option<String>,
    },
    /// Keep a held candidate (by the id `held` prints), in your name — if its subject's consent
    /// covers it now.
    Approve {
        id: String,
        /// Who approves (a local store only: the gateway service takes who you are from your
        /// token); default: the local user.
        #[arg(long)]
        by: Option<String>,
    },
    /// Drop a held candidate: nothing of it is kept.
    Reject { id: String },
    /// Forget one item (by the id `list` prints) or, with --scope, every item of a scope.
    Forget {
        /// The item's id.
        #[arg(required_unless_present = "scope", conflicts_with = "scope")]
        id: Option<String>,
        /// Every item of this scope: agent:<name>, subject:<handle> or tenant.
        #[arg(long)]
        scope: Option<String>,
    },
}

pub async fn run(global: &GlobalArgs, command: MemoryCommand) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    match command {
        MemoryCommand::List {
            scope,
            memory_type,
            query,
            max,
            entity_type,
        } => {
            let scope: ItemScope = scope.parse().context("--scope")?;
            let entity_type = entity_type
                .as_deref()
                .map(EntityTypeName::new)
                .transpose()
                .map_err(anyhow::Error::msg)
                .context("--entity-type")?;
            let memory_type = memory_type
                .as_deref()
                .map(parse_type)
                .transpose()
                .context("--type")?;
            if !(1..=MAX_RECALL_ITEMS).contains(&max) {
                anyhow::bail!("--max {max}: list 1 to {MAX_RECALL_ITEMS} items at a time");
            }
            let listed = match &store {
                AnyStore::Gateway(remote) => {
                    RemoteMemory(remote)
                        .list(&scope, memory_type, &query, max, entity_type.as_ref())
                        .await?
                }
                local => {
                    let q = RecallQuery {
                        scope: scope.clone(),
                        memory_type,
                        text: query,
                        max_items: max,
                        purpose: None,
                        entity_type,
                    };
                    MemoryBank::new(local, &tenant)
                        .recall(&q, |_| Ok(()))
                        .await?
                        .offered
                        .into_iter()
                        .map(|(id, item)| Listed { id, item })
                        .collect()
                }
            };
            if listed.is_empty() {
                println!("no items in scope {scope} of tenant {tenant}");
            }
            for Listed { id, item } in listed {
                let categories: Vec<String> = item.categories.iter().map(ToString::to_string).collect();
                let entities: Vec<String> = item.entities.iter().map(ToString::to_string).collect();
                println!(
                    "{id}  {:<10} run {} at {} ms{}{}\n    {}",
                    type_name(item.memory_type),
                    item.provenance.run_id,
                    item.provenance.at_ms,
                    if categories.is_empty() {
                        String::new()
                    } else {
                        format!("  personal data: {}", categories.join(", "))
                    },
                    if entities.is_empty() {
                        String::new()
                    } else {
                        // Escaped like the text: ids are what a model proposed.
                        format!("  about: {}", for_terminal(&entities.join(", ")))
                    },
                    // Printed escaped: an item's text cannot forge the lines after it.
                    for_terminal(&item.text)
                );
            }
        }
        MemoryCommand::Held { scope } => {
            let scope = scope
                .as_deref()
                .map(str::parse::<ItemScope>)
                .transpose()
                .context("--scope")?;
            let held = match &store {
                AnyStore::Gateway(remote) => RemoteMemory(remote).held(scope.as_ref()).await?,
                local => HeldCandidates::new(local, &tenant)
                    .list(scope.as_ref(), now_ms())
                    .await?
                    .into_iter()
                    .map(|(id, held)| HeldListed { id, held })
                    .collect(),
            };
            if held.is_empty() {
                println!("no candidates held in tenant {tenant}");
            }
            for HeldListed { id, held } in held {
                println!(
                    "{id}  {:<10} {} from run {}\n    {}\n    held: {}",
                    type_name(held.item.memory_type),
                    held.item.scope,
                    held.item.provenance.run_id,
                    contextos_runner::text::for_terminal(&held.item.text),
                    contextos_runner::text::for_terminal(&held.reason)
                );
            }
        }
        MemoryCommand::Approve { id, by } => {
            let id = item_id(&id)?;
            let approved = match &store {
                AnyStore::Gateway(remote) => {
                    if by.is_some() {
                        anyhow::bail!(
                            "--by: the gateway service records who you are from your token; leave --by out"
                        );
                    }
                    RemoteMemory(remote).approve(&id).await?
                }
                local => {
                    let by = by.unwrap_or_else(GlobalArgs::local_user);
                    let key = global.verifying_key(None)?;
                    HeldCandidates::new(local, &tenant)
                        .approve_under_consent(&id, &by, now_ms(), &key)
                        .await?
                        .into()
                }
            };
            println!(
                "kept: {}{}",
                approved.item,
                if approved.already_kept {
                    " (the same was kept already)"
                } else {
                    ""
                }
            );
        }
        MemoryCommand::Reject { id } => {
            let id = item_id(&id)?;
            let rejected = match &store {
                AnyStore::Gateway(remote) => RemoteMemory(remote).reject(&id).await?,
                local => HeldCandidates::new(local, &tenant).reject(&id).await?,
            };
            if !rejected {
                anyhow::bail!("tenant {tenant} holds no candidate {id}");
            }
            println!("rejected: {id}");
        }
        MemoryCommand::Forget { id, scope } => match (id, scope) {
            (Some(id), _) => {
                let id = item_id(&id)?;
                let forgotten = match &store {
                    AnyStore::Gateway(remote) => RemoteMemory(remote).forget(&id).await?,
                    local => MemoryBank::new(local, &tenant).forget(&id).await?,
                };
                if forgotten {
                    println!("forgotten: {id}");
                } else {
                    anyhow::bail!("tenant {tenant} keeps no item {id}");
                }
            }
            (None, Some(scope)) => {
                let scope: ItemScope = scope.parse().context("--scope")?;
                let forgotten = match &store {
                    AnyStore::Gateway(remote) => RemoteMemory(remote).forget_scope(&scope).await?,
                    local => {
                        MemoryBank::new(local, &tenant)
                            .forget_scope_and_held(&scope)
                            .await?
                    }
                };
                println!("forgotten: {forgotten} items of scope {scope}");
            }
            (None, None) => anyhow::bail!("name an item id or --scope"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn item_id(text: &str) -> anyhow::Result<ItemId> {
    Hash::parse(text).map(ItemId).with_context(|| {
        format!("{text:?} is no item id (64 hex digits, as `memory list` and `memory held` print)")
    })
}
