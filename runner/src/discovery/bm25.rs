//! BM25 over tool documents: the keyword resolver, the baseline the embedding resolver is
//! measured against, and the fallback when no embedding model is at hand.

use std::collections::HashMap;

/// Term-frequency saturation and length normalisation: the usual Okapi values.
const K1: f32 = 1.2;
const B: f32 = 0.75;

/// An index over a fixed list of documents.
#[derive(Debug, Clone)]
pub struct Bm25Index {
    /// Per term, the documents holding it and how often (an inverted index: a query touches
    /// only the documents that share one of its terms).
    postings: HashMap<String, Vec<(usize, f32)>>,
    lengths: Vec<f32>,
    average_length: f32,
    /// Inverse document frequency of each term seen.
    idf: HashMap<String, f32>,
}

impl Bm25Index {
    /// Indexes `documents` (scores come back in this order).
    pub fn new<'a>(documents: impl IntoIterator<Item = &'a str>) -> Self {
        let docs: Vec<HashMap<String, u32>> = documents
            .into_iter()
            .map(|text| {
                let mut counts = HashMap::new();
                for term in terms(text) {
                    *counts.entry(term).or_insert(0) += 1;
                }
                counts
            })
            .collect();
        let lengths: Vec<f32> = docs.iter().map(|d| d.values().sum::<u32>() as f32).collect();
        let average_length = if docs.is_empty() {
            1.0
        } else {
            (lengths.iter().sum::<f32>() / docs.len() as f32).max(1.0)
        };
        let mut frequency: HashMap<&str, u32> = HashMap::new();
        for doc in &docs {
            for term in doc.keys() {
                *frequency.entry(term).or_insert(0) += 1;
            }
        }
        let n = docs.len() as f32;
        let idf = frequency
            .into_iter()
            .map(|(term, df)| {
                let df = df as f32;
                (term.to_owned(), ((n - df + 0.5) / (df + 0.5) + 1.0).ln())
            })
            .collect();
        let mut postings: HashMap<String, Vec<(usize, f32)>> = HashMap::new();
        for (d, doc) in docs.into_iter().enumerate() {
            for (term, count) in doc {
                postings.entry(term).or_default().push((d, count as f32));
            }
        }
        Self {
            postings,
            lengths,
            average_length,
            idf,
        }
    }

    /// The score of every document for `query`, in index order (0 where no term matches).
    pub fn scores(&self, query: &str) -> Vec<f32> {
        let mut query_terms = terms(query);
        query_terms.sort_unstable();
        query_terms.dedup();
        let mut scores = vec![0.0f32; self.lengths.len()];
        for term in &query_terms {
            let (Some(idf), Some(postings)) = (self.idf.get(term), self.postings.get(term)) else {
                continue;
            };
            for &(doc, tf) in postings {
                let norm = K1 * (1.0 - B + B * self.lengths[doc] / self.average_length);
                scores[doc] += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        scores
    }
}

/// Lowercased words of `text` without stopwords, each cut to a crude stem, so `restarts`,
/// `restarted` and `restarting` meet `restart`.
pub fn terms(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .map(|w| stem(&w).to_owned())
        .collect()
}

fn stem(word: &str) -> &str {
    for suffix in ["ing", "ed", "es", "s"] {
        if let Some(stem) = word.strip_suffix(suffix)
            && stem.chars().count() >= 3
        {
            return stem;
        }
    }
    word
}

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from", "has", "have",
    "how", "i", "if", "in", "into", "is", "it", "its", "me", "my", "of", "on", "or", "our", "please", "so",
    "that", "the", "their", "them", "then", "there", "this", "to", "up", "us", "was", "we", "what", "when",
    "where", "which", "who", "why", "will", "with", "you", "your",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_sharing_rare_terms_scores_highest() {
        let index = Bm25Index::new([
            "restart deployment: restart the pods of a deployment",
            "list invoices of a customer account",
            "search logs of a service for a pattern",
        ]);
        let scores = index.scores("the checkout deployment keeps crashing, restart it");
        assert!(scores[0] > 0.0);
        assert_eq!((scores[1], scores[2]), (0.0, 0.0));
        let scores = index.scores("find errors in the service logs");
        assert!(scores[2] > scores[0] && scores[2] > scores[1]);
    }

    #[test]
    fn word_forms_and_stopwords_do_not_matter() {
        assert_eq!(terms("Restarting the Deployments"), vec!["restart", "deployment"]);
        assert_eq!(terms("it is what it is"), Vec::<String>::new());
    }

    #[test]
    fn an_empty_index_or_query_scores_nothing() {
        assert!(Bm25Index::new([]).scores("anything").is_empty());
        assert_eq!(Bm25Index::new(["restart deployment"]).scores(""), vec![0.0]);
    }
}
