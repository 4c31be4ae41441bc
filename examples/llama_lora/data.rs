//! Training data: the generated default dataset, JSONL files, the start-up tokenizer, and
//! batches with the prompt masked out of the loss.

use candle_core::{bail, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// One training example.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Instruction tuning: only the response (and the end token) is learned.
    Chat { prompt: String, response: String },
    /// Plain text: every token is learned.
    Text(String),
}

/// The prompt template around an instruction (the response follows it directly).
pub fn format_prompt(prompt: &str) -> String {
    format!("### Instruction:\n{prompt}\n### Response:\n")
}

/// A generated instruction → response dataset: capitals, sums, colours, opposites, greetings
/// and spelling, drawn with `seed`. Small enough for a tiny model to learn its patterns within a
/// minute on two CPU cores.
pub fn builtin_dataset(n: usize, seed: u64) -> Vec<Example> {
    const CAPITALS: [(&str, &str); 12] = [
        ("France", "Paris"),
        ("Japan", "Tokyo"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Egypt", "Cairo"),
        ("Peru", "Lima"),
        ("Kenya", "Nairobi"),
        ("Canada", "Ottawa"),
        ("Norway", "Oslo"),
        ("Chile", "Santiago"),
        ("India", "New Delhi"),
        ("Greece", "Athens"),
    ];
    const COLOURS: [(&str, &str); 8] = [
        ("the sky", "blue"),
        ("grass", "green"),
        ("snow", "white"),
        ("a banana", "yellow"),
        ("coal", "black"),
        ("a tomato", "red"),
        ("an orange", "orange"),
        ("a plum", "purple"),
    ];
    const OPPOSITES: [(&str, &str); 10] = [
        ("hot", "cold"),
        ("up", "down"),
        ("big", "small"),
        ("fast", "slow"),
        ("light", "dark"),
        ("open", "closed"),
        ("early", "late"),
        ("happy", "sad"),
        ("full", "empty"),
        ("old", "new"),
    ];
    const NAMES: [&str; 10] = [
        "Ada", "Alan", "Grace", "Linus", "Ken", "Barbara", "Dennis", "Edsger", "Frances", "John",
    ];
    const WORDS: [&str; 10] = [
        "cat", "tree", "rust", "candle", "river", "stone", "cloud", "apple", "bread", "light",
    ];
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (prompt, response) = match rng.random_range(0..6) {
                0 => {
                    let (c, k) = CAPITALS[rng.random_range(0..CAPITALS.len())];
                    (
                        format!("What is the capital of {c}?"),
                        format!("The capital of {c} is {k}."),
                    )
                }
                1 => {
                    let (a, b) = (rng.random_range(0..50), rng.random_range(0..50));
                    (
                        format!("Add {a} and {b}."),
                        format!("{a} plus {b} is {}.", a + b),
                    )
                }
                2 => {
                    let (t, c) = COLOURS[rng.random_range(0..COLOURS.len())];
                    (
                        format!("What colour is {t}?"),
                        format!("The colour of {t} is {c}."),
                    )
                }
                3 => {
                    let (w, o) = OPPOSITES[rng.random_range(0..OPPOSITES.len())];
                    (
                        format!("What is the opposite of {w}?"),
                        format!("The opposite of {w} is {o}."),
                    )
                }
                4 => {
                    let name = NAMES[rng.random_range(0..NAMES.len())];
                    (
                        format!("Greet {name}."),
                        format!("Hello, {name}! Nice to meet you."),
                    )
                }
                _ => {
                    let w = WORDS[rng.random_range(0..WORDS.len())];
                    let spelled: Vec<String> = w.chars().map(|c| c.to_string()).collect();
                    (
                        format!("Spell {w}."),
                        format!("{w} is spelled {}.", spelled.join("-")),
                    )
                }
            };
            Example::Chat { prompt, response }
        })
        .collect()
}

/// Reads a JSONL file of `{"prompt", "response"}` or `{"text"}` objects (blank lines skipped).
///
/// # Errors
/// A line that is not JSON or has neither shape (with its line number), or no examples.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))?;
    let mut examples = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = format!("{} line {}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| candle_core::Error::msg(format!("{where_}: not valid JSON: {e}")))?;
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        examples.push(match (field("prompt"), field("response"), field("text")) {
            (Some(prompt), Some(response), _) => Example::Chat { prompt, response },
            (_, _, Some(text)) => Example::Text(text),
            _ => bail!("{where_}: expected an object with string fields \"prompt\" and \"response\", or \"text\""),
        });
    }
    if examples.is_empty() {
        bail!("{}: the dataset is empty", path.display())
    }
    Ok(examples)
}

/// Special tokens of the start-up tokenizer.
pub const BOS: &str = "<s>";
/// End of a response.
pub const EOS: &str = "</s>";

/// A byte-level BPE tokenizer with `vocab_size` entries trained on `examples` (deterministic:
/// same examples, same tokenizer).
pub fn train_tokenizer(examples: &[Example], vocab_size: usize) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::new(BPE::default());
    // No prefix space: prompt and response are encoded separately and joined.
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .show_progress(false)
            .special_tokens(vec![
                AddedToken::from(BOS, true),
                AddedToken::from(EOS, true),
            ])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let texts = examples.iter().map(|e| match e {
        Example::Chat { prompt, response } => format!("{}{response}", format_prompt(prompt)),
        Example::Text(t) => t.clone(),
    });
    tokenizer
        .train(&mut trainer, texts)
        .map_err(|e| candle_core::Error::msg(format!("tokenizer training: {e}")))?;
    Ok(tokenizer)
}

/// Token ids of `text` (no special tokens added).
pub fn encode(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| candle_core::Error::msg(format!("tokenizing {text:?}: {e}")))?
        .get_ids()
        .to_vec())
}

/// Tokenized examples ready for batching.
pub struct Dataset {
    /// Per example: tokens (at most `seq_len + 1`) and, per position after the first, whether
    /// predicting that token counts in the loss.
    pub examples: Vec<(Vec<u32>, Vec<f32>)>,
    pub pad: u32,
}

impl Dataset {
    /// Tokenizes `examples`: `[bos] prompt response [eos]`, the prompt masked out; truncated to
    /// `seq_len + 1` tokens.
    ///
    /// # Errors
    /// No examples, or no example with a token to learn.
    pub fn new(
        examples: &[Example],
        tokenizer: &Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        seq_len: usize,
    ) -> Result<Self> {
        if examples.is_empty() {
            bail!("the dataset is empty")
        }
        if seq_len < 2 {
            bail!("--seq-len must be at least 2, got {seq_len}")
        }
        let mut out = Vec::with_capacity(examples.len());
        for e in examples {
            let mut tokens: Vec<u32> = bos.into_iter().collect();
            let mut learn: Vec<f32> = Vec::new();
            let (prompt, answer) = match e {
                Example::Chat { prompt, response } => (format_prompt(prompt), response.as_str()),
                Example::Text(t) => (String::new(), t.as_str()),
            };
            for (part, weight) in [(prompt.as_str(), 0.0), (answer, 1.0)] {
                if part.is_empty() {
                    continue;
                }
                let ids = encode(tokenizer, part)?;
                learn.extend(std::iter::repeat_n(weight, ids.len()));
                tokens.extend(ids);
            }
            if let Some(eos) = eos {
                tokens.push(eos);
                learn.push(1.0);
            }
            // Weights are per predicted token: the first token is never predicted.
            if bos.is_none() && !learn.is_empty() {
                learn.remove(0);
            }
            tokens.truncate(seq_len + 1);
            learn.truncate(tokens.len().saturating_sub(1));
            if learn.iter().any(|&w| w > 0.0) {
                out.push((tokens, learn));
            }
        }
        if out.is_empty() {
            bail!("no example has a token to learn within --seq-len {seq_len}")
        }
        Ok(Self {
            examples: out,
            pad: eos.unwrap_or(0),
        })
    }

    /// Inputs `[b, t]` (u32), targets `[b, t]` (u32) and loss weights `[b, t]` (f32) for the
    /// examples at `indices`, padded to the longest (padding weighs 0).
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
        let t = indices
            .iter()
            .map(|&i| self.examples[i].0.len() - 1)
            .max()
            .unwrap_or(0);
        let (mut inputs, mut targets, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        for &i in indices {
            let (tokens, learn) = &self.examples[i];
            let n = tokens.len() - 1;
            inputs.extend(&tokens[..n]);
            targets.extend(&tokens[1..]);
            weights.extend(learn);
            inputs.extend(std::iter::repeat_n(self.pad, t - n));
            targets.extend(std::iter::repeat_n(self.pad, t - n));
            weights.extend(std::iter::repeat_n(0f32, t - n));
        }
        let b = indices.len();
        Ok((
            Tensor::from_vec(inputs, (b, t), device)?,
            Tensor::from_vec(targets, (b, t), device)?,
            Tensor::from_vec(weights, (b, t), device)?,
        ))
    }

    /// The examples of micro-batch `micro` of step `step`: drawn from a generator seeded by
    /// (seed, step, micro), so a resumed run sees the same batches.
    pub fn draw(&self, seed: u64, step: usize, micro: usize, batch_size: usize) -> Vec<usize> {
        let mut rng = StdRng::seed_from_u64(seed ^ ((step as u64) << 20) ^ (micro as u64) ^ 0xda7a);
        (0..batch_size)
            .map(|_| rng.random_range(0..self.examples.len()))
            .collect()
    }
}
