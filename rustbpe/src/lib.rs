//! aquainterp._rustbpe: the Rust core of aquainterp's tokenizer (BPE training and encoding).
//! Python-facing glue only; the algorithms live in train.rs and encode.rs.
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;
use std::sync::OnceLock;

mod encode;
mod pattern;
mod train;

use encode::{Encoder, SPECIAL_TOKENS};

pub const MIN_VOCAB_SIZE: usize = 512;
pub const MAX_VOCAB_SIZE: usize = 65536;

/// Version of the Rust core, so Python can check it loaded the build it expects.
#[pyfunction]
fn core_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The chunks BPE works on: `text` cut by the split pattern (they concatenate back to `text`).
#[pyfunction]
fn split_text(text: &str) -> PyResult<Vec<String>> {
    static SPLITTER: OnceLock<Result<pattern::Splitter, String>> = OnceLock::new();
    let splitter = SPLITTER.get_or_init(pattern::Splitter::new).as_ref().map_err(|e| value_error(e.clone()))?;
    let mut chunks = Vec::new();
    splitter.for_each_chunk(text, |c| chunks.push(c.to_owned()));
    Ok(chunks)
}

fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// A trained byte-level BPE: 256 byte tokens, then the merges, then the 9 special tokens.
#[pyclass(module = "aquainterp._rustbpe", frozen)]
struct Bpe {
    encoder: Encoder,
}

#[pymethods]
impl Bpe {
    /// Trains on a Python iterable of str, pulled `buffer_size` texts at a time (streaming); each
    /// buffer is split and counted in parallel with the GIL released. `vocab_size` counts the 256
    /// byte tokens, the merges and the special tokens. `progress(merges_done, merges_wanted)`, if given,
    /// is called when merging starts (after the corpus is read), every 1000 merges and at the end.
    #[staticmethod]
    #[pyo3(signature = (texts, vocab_size, buffer_size = 8192, progress = None))]
    fn train(
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        vocab_size: i64,
        buffer_size: i64,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Bpe> {
        let lo = MIN_VOCAB_SIZE as i64;
        let hi = MAX_VOCAB_SIZE as i64;
        if !(lo..=hi).contains(&vocab_size) {
            return Err(value_error(format!(
                "vocab_size must be between {lo} and {hi} (256 byte tokens + merges + {} special tokens); got {vocab_size}",
                SPECIAL_TOKENS.len()
            )));
        }
        if buffer_size < 1 {
            return Err(value_error(format!("buffer_size must be >= 1; got {buffer_size}")));
        }
        let splitter = pattern::Splitter::new().map_err(value_error)?;
        let mut iter = texts.try_iter().map_err(|_| {
            PyTypeError::new_err(format!(
                "training texts must be an iterable of str; got {}",
                texts.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        let mut counts = train::ChunkCounts::default();
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size as usize);
        let mut seen = 0usize;
        let mut exhausted = false;
        while !exhausted {
            buffer.clear();
            while buffer.len() < buffer_size as usize {
                let Some(item) = iter.next() else {
                    exhausted = true;
                    break;
                };
                let item = item?;
                let text = item.cast::<PyString>().map_err(|_| {
                    PyTypeError::new_err(format!(
                        "training text #{seen} is {}, expected str",
                        item.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                    ))
                })?;
                buffer.push(text.to_str()?.to_owned());
                seen += 1;
            }
            py.detach(|| counts.add_texts(&splitter, &buffer));
        }
        if counts.is_empty() {
            return Err(value_error(format!(
                "training corpus is empty: the iterator gave {seen} texts and none had any characters"
            )));
        }
        let num_merges = vocab_size as usize - 256 - SPECIAL_TOKENS.len();
        let mut callback_error: Option<PyErr> = None;
        let merges = py.detach(|| {
            train::learn_merges(counts, num_merges, |done| {
                if let (Some(cb), None) = (&progress, &callback_error) {
                    callback_error = Python::attach(|py| cb.call1(py, (done, num_merges)).err());
                }
            })
        });
        if let Some(e) = callback_error {
            return Err(e);
        }
        let encoder = Encoder::new(merges).map_err(value_error)?;
        Ok(Bpe { encoder })
    }

    /// Rebuilds a tokenizer from its merges, as `merges` returns them.
    #[staticmethod]
    fn from_merges(merges: Vec<(i64, i64)>) -> PyResult<Bpe> {
        let max_merges = MAX_VOCAB_SIZE - 256 - SPECIAL_TOKENS.len();
        if merges.len() > max_merges {
            return Err(value_error(format!("{} merges is more than the maximum {max_merges}", merges.len())));
        }
        let mut pairs = Vec::with_capacity(merges.len());
        for (k, &(a, b)) in merges.iter().enumerate() {
            if a < 0 || b < 0 || a > u32::MAX as i64 || b > u32::MAX as i64 {
                return Err(value_error(format!("merge #{k} ({a}, {b}) has a negative or too large token id")));
            }
            pairs.push((a as u32, b as u32));
        }
        Ok(Bpe { encoder: Encoder::new(pairs).map_err(value_error)? })
    }

    /// The merges in order: merge k joins (left, right) into token 256 + k.
    #[getter]
    fn merges(&self) -> Vec<(u32, u32)> {
        self.encoder.merges().to_vec()
    }

    /// Number of tokens, special tokens included.
    #[getter]
    fn vocab_size(&self) -> usize {
        self.encoder.vocab_size()
    }

    /// Byte strings of the ordinary tokens (no specials), indexed by id.
    fn token_bytes<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        (0..self.encoder.num_ordinary() as u32)
            .map(|id| PyBytes::new(py, self.encoder.token_bytes(id).unwrap_or_default()))
            .collect()
    }

    /// Id of a special token such as "<|bos|>".
    fn encode_special(&self, name: &str) -> PyResult<u32> {
        self.encoder.special_id(name).ok_or_else(|| {
            value_error(format!("unknown special token {name:?}; the special tokens are {}", SPECIAL_TOKENS.join(", ")))
        })
    }

    /// Token ids of `text`; special-token strings inside it are encoded as ordinary text.
    fn encode(&self, py: Python<'_>, text: &str) -> Vec<u32> {
        py.detach(|| self.encoder.encode(text))
    }

    /// Encodes many texts in parallel (rayon) with the GIL released.
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> Vec<Vec<u32>> {
        py.detach(|| texts.par_iter().map(|t| self.encoder.encode(t)).collect())
    }

    /// Bytes of the tokens concatenated (special tokens as their names).
    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<i64>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = self.encoder.decode_bytes(&ids).map_err(value_error)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Text of the tokens; byte sequences that are not valid UTF-8 become U+FFFD.
    fn decode(&self, ids: Vec<i64>) -> PyResult<String> {
        let bytes = self.encoder.decode_bytes(&ids).map_err(value_error)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

#[pymodule]
fn _rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add_class::<Bpe>()?;
    m.add("SPLIT_PATTERN", pattern::SPLIT_PATTERN)?;
    m.add("SPECIAL_TOKENS", SPECIAL_TOKENS.to_vec())?;
    m.add("MIN_VOCAB_SIZE", MIN_VOCAB_SIZE)?;
    m.add("MAX_VOCAB_SIZE", MAX_VOCAB_SIZE)?;
    Ok(())
}
