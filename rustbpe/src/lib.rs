//! aquainterp._rustbpe: the Rust core of aquainterp's tokenizer.
use pyo3::prelude::*;

/// Version of the Rust core, so Python can check it loaded the build it expects.
#[pyfunction]
fn core_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _rustbpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(core_version, m)?)?;
    Ok(())
}
