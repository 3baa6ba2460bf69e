//! `contextos consent grant|revoke|list|show`: a tenant's consent records in its store, each
//! appended to its subject's chain (never edited), and what is in force from them.

use std::{collections::BTreeSet, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use contextos_runner::{
    consent::{ConsentAction, Purpose, SubjectHandle},
    keys::{KeyPair, PublicKey},
    memory::consents::{ConsentBook, ConsentHistory, ConsentLink, ConsentRequest, RemoteConsents},
    personal_data::Category,
    records::{AnyStore, TenantId, store::remote::RemoteStore},
    text::for_terminal,
};

use super::GlobalArgs;

/// The most subjects `consent list` prints.
const LIST_LIMIT: usize = 10_000;

#[derive(Debug, Subcommand)]
pub enum ConsentCommand {
    /// Record that a subject consents to categories of their personal data being kept for a
    /// purpose.
    Grant {
        #[command(flatten)]
        about: About,
        /// Categories granted, comma-separated: email, phone, payment-card, iban, ip-address,
        /// government-id, or tenant:<pattern name>.
        #[arg(long, value_delimiter = ',', required = true)]
        categories: Vec<String>,
        /// Where the person's decision is kept: a ticket, a signed form.
        #[arg(long)]
        evidence: String,
        /// The grant ends after this long (e.g. 90d, 12h); default: until revoked.
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// Record that a subject takes consent back (all categories of the purpose unless some are
    /// named). Takes effect at the next recall.
    Revoke {
        #[command(flatten)]
        about: About,
        /// Categories revoked, comma-separated; none: every category of the purpose.
        #[arg(long, value_delimiter = ',')]
        categories: Vec<String>,
        /// Where the person's decision is kept (optional for a revocation).
        #[arg(long, default_value = "")]
        evidence: String,
    },
    /// List the subjects that have consent records.
    List,
    /// Print a subject's consent history (verified) and what is in force now.
    Show {
        /// The subject's handle.
        subject: String,
        /// Public key (hex) the history's head is verified with; default: the data directory's
        /// key, or through the gateway the key it publishes for the namespace.
        #[arg(long, env = "CONTEXTOS_RECORD_PUBLIC_KEY")]
        public_key: Option<String>,
        /// The gateway's record-key certifier (hex), to check the key the gateway publishes for
        /// the namespace against: `kubectl get configmap contextos-gateway-keys -n
        /// contextos-system -o jsonpath='{.data.record-certifier\.pub}'`. Without it (and
        /// without --public-key, which is used as it is when given) the key is taken on the
        /// word of whatever answers at --store.
        #[arg(long, env = "CONTEXTOS_RECORD_CERTIFIER")]
        certifier: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct About {
    /// The subject's pseudonymous handle (never a name or an e-mail address).
    #[arg(long)]
    subject: String,
    /// What the data is kept for, as the Agent's memory policy names it.
    #[arg(long)]
    purpose: String,
    /// Who records it (a local store only: the gateway service records who you are from your
    /// token); default: the local user.
    #[arg(long)]
    by: Option<String>,
}

/// Where consent records are kept: the store itself, or the gateway service's consent API (a
/// person with their own token; the gateway records who they are).
enum Book<'s> {
    Local(ConsentBook<'s, AnyStore>),
    Gateway(RemoteConsents<'s>),
}

/// A fresh id for one request, so that a request sent again is not appended twice.
fn request_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness for a request id: {e}"))?;
    Ok(hex::encode(bytes))
}

impl Book<'_> {
    async fn append(
        &self,
        global: &GlobalArgs,
        about: About,
        request: ConsentRequest,
    ) -> anyhow::Result<ConsentLink> {
        Ok(match self {
            Self::Local(book) => {
                let key_path = global.key_path();
                let key = KeyPair::load_or_create(&key_path)
                    .with_context(|| format!("the signing key {}", key_path.display()))?;
                let by = about.by.unwrap_or_else(GlobalArgs::local_user);
                book.append(request.into_record(by, now_ms()), &key).await?
            }
            Self::Gateway(remote) => {
                if about.by.is_some() {
                    bail!("--by: the gateway service records who you are from your token; leave --by out");
                }
                remote.append(&request).await?
            }
        })
    }

    async fn history(
        &self,
        global: &GlobalArgs,
        tenant: &TenantId,
        subject: &SubjectHandle,
        public_key: Option<&str>,
        certifier: Option<&str>,
    ) -> anyhow::Result<ConsentHistory> {
        // A certifier vouches only for a key a gateway publishes: said when it has nothing to
        // check (CONTEXTOS_RECORD_CERTIFIER may be set for every command).
        let unused = |why: &str| {
            if certifier.is_some() {
                eprintln!("note: --certifier is not used: {why}");
            }
        };
        Ok(match self {
            Self::Local(book) => {
                unused("a local store's history is verified with the data directory's key or --public-key");
                book.history(subject, &global.verifying_key(public_key)?).await?
            }
            Self::Gateway(remote) => {
                let key = match public_key {
                    Some(hex) => {
                        unused("--public-key names the key");
                        PublicKey::from_hex(hex)?
                    }
                    None => {
                        let certifier = certifier
                            .map(PublicKey::from_hex)
                            .transpose()
                            .context("--certifier")?;
                        published_key(remote.0, tenant, certifier.as_ref()).await?
                    }
                };
                remote.history(tenant, subject, &key).await?
            }
        })
    }

    async fn subjects(&self, limit: usize) -> anyhow::Result<Vec<SubjectHandle>> {
        Ok(match self {
            Self::Local(book) => book.subjects(limit).await?,
            Self::Gateway(remote) => remote.subjects(limit).await?,
        })
    }
}

pub async fn run(global: &GlobalArgs, command: ConsentCommand) -> anyhow::Result<ExitCode> {
    let tenant = global.tenant()?;
    let store = global.open_records(&tenant).await?;
    let book = match &store {
        AnyStore::Gateway(remote) => Book::Gateway(RemoteConsents(remote)),
        local => Book::Local(ConsentBook::new(local, &tenant)),
    };
    match command {
        ConsentCommand::Grant {
            about,
            categories,
            evidence,
            expires_in,
        } => {
            let now = now_ms();
            let expires_at_ms = expires_in
                .map(|text| super::parse_span("--expires-in", &text).map(|d| now + d.as_millis() as i64))
                .transpose()?;
            let request = about.request(ConsentAction::Grant, &categories, evidence, expires_at_ms)?;
            let link = book.append(global, about, request).await?;
            println!(
                "granted: subject {} link {} {}",
                link.record.subject, link.seq, link.hash
            );
        }
        ConsentCommand::Revoke {
            about,
            categories,
            evidence,
        } => {
            let request = about.request(ConsentAction::Revoke, &categories, evidence, None)?;
            let link = book.append(global, about, request).await?;
            println!(
                "revoked: subject {} link {} {}",
                link.record.subject, link.seq, link.hash
            );
        }
        ConsentCommand::List => {
            let subjects = book.subjects(LIST_LIMIT).await?;
            if subjects.is_empty() {
                println!("no consent records in tenant {tenant}");
            }
            for subject in subjects {
                println!("{subject}");
            }
        }
        ConsentCommand::Show {
            subject,
            public_key,
            certifier,
        } => {
            let subject = SubjectHandle::new(&subject).context("subject")?;
            let history = book
                .history(
                    global,
                    &tenant,
                    &subject,
                    public_key.as_deref(),
                    certifier.as_deref(),
                )
                .await?;
            if history.links.is_empty() {
                bail!("subject {subject} has no consent records in tenant {tenant}");
            }
            print_history(&history, now_ms());
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl About {
    fn request(
        &self,
        action: ConsentAction,
        categories: &[String],
        evidence: String,
        expires_at_ms: Option<i64>,
    ) -> anyhow::Result<ConsentRequest> {
        let categories = categories
            .iter()
            .map(|c| {
                c.trim()
                    .parse::<Category>()
                    .with_context(|| format!("--categories: {c:?}"))
            })
            .collect::<anyhow::Result<BTreeSet<_>>>()?;
        Ok(ConsentRequest {
            subject: SubjectHandle::new(&self.subject).context("--subject")?,
            purpose: Purpose::new(&self.purpose).context("--purpose")?,
            action,
            categories,
            evidence,
            expires_at_ms,
            request_id: Some(request_id()?),
        })
    }
}

/// The key the gateway publishes for `tenant` (what its consent heads are signed with), checked
/// against `certifier` when given: over a channel someone else answers on, an unchecked key
/// would verify a history that someone wrote.
async fn published_key(
    remote: &RemoteStore,
    tenant: &TenantId,
    certifier: Option<&PublicKey>,
) -> anyhow::Result<PublicKey> {
    let published = contextos_runner::key_secrets::fetch_tenant_key(
        remote.base(),
        tenant.as_str(),
        std::time::Duration::from_secs(30),
    )
    .await
    .map_err(|e| anyhow::anyhow!("fetching the namespace's published key: {e}; or pass --public-key"))?;
    match certifier {
        Some(certifier) => published
            .vouched(tenant.as_str(), certifier)
            .map_err(|e| anyhow::anyhow!("the namespace's key from {}: {e}", remote.base())),
        None => {
            eprintln!(
                "note: namespace {tenant}'s key was taken from {} unchecked; pass --certifier to check it",
                remote.base()
            );
            Ok(published.key)
        }
    }
}

fn print_history(history: &ConsentHistory, now_ms: i64) {
    println!(
        "{:<4} {:<7} {:<24} {:<32} {:<28} evidence",
        "seq", "action", "purpose", "categories", "by"
    );
    for link in &history.links {
        let r = &link.record;
        let categories = if r.categories.is_empty() {
            "(all)".to_owned()
        } else {
            r.categories
                .iter()
                .map(Category::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        let action = match r.action {
            ConsentAction::Grant => "grant",
            ConsentAction::Revoke => "revoke",
        };
        // Validated records hold no control characters; printed escaped all the same, so no
        // field can forge the lines after it.
        println!(
            "{:<4} {action:<7} {:<24} {categories:<32} {:<28} {}",
            link.seq,
            r.purpose,
            for_terminal(&r.by).to_string(),
            for_terminal(&r.evidence)
        );
    }
    let ledger = history.ledger();
    let subject = &history.links[0].record.subject;
    let purposes: BTreeSet<&Purpose> = history.links.iter().map(|l| &l.record.purpose).collect();
    println!();
    for purpose in purposes {
        let all: BTreeSet<Category> = history
            .links
            .iter()
            .filter(|l| l.record.purpose == *purpose)
            .flat_map(|l| l.record.categories.iter().cloned())
            .collect();
        let uncovered = ledger.uncovered(subject, purpose, &all, now_ms);
        let in_force: Vec<String> = all.difference(&uncovered).map(Category::to_string).collect();
        println!(
            "in force for {purpose}: {}",
            if in_force.is_empty() {
                "nothing".to_owned()
            } else {
                in_force.join(", ")
            }
        );
    }
    if let Some(head) = history.head_hash() {
        let n = history.links.len();
        println!(
            "chain verified: {n} record{}, signed head {head}",
            if n == 1 { "" } else { "s" }
        );
    }
}

fn now_ms() -> i64 {
    contextos_runner::records::recorder::now_ms()
}
