//! Just enough of the ONNX file format to take a model's weights out of it: the graph's
//! initializers (named float tensors) and its nodes (operator, inputs, outputs, and the value of
//! small `Constant`s). The encoder in `bert.rs` evaluates a known architecture with these
//! weights; nothing here runs the graph.
//!
//! ONNX files are protocol buffers. The reader below walks the wire format directly over the
//! file's bytes (every length checked against what is left, so a truncated or damaged file is an
//! error, never a panic; what it allocates is bounded by the file's size) and keeps only the
//! fields it needs:
//!
//! - `ModelProto.graph` (7) → `GraphProto.node` (1), `GraphProto.initializer` (5);
//! - `NodeProto`: `input` (1), `output` (2), `op_type` (4), `attribute` (5) → `AttributeProto.t` (5);
//! - `TensorProto`: `dims` (1), `data_type` (2), `float_data` (4), `int64_data` (7), `name` (8),
//!   `raw_data` (9).

use std::collections::HashMap;

/// A float tensor of the graph.
#[derive(Debug)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub values: Vec<f32>,
}

/// One node of the graph, as far as the encoder needs it.
#[derive(Debug, Default)]
pub struct Node {
    pub op_type: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// For a `Constant` holding one number: that number.
    pub constant: Option<f64>,
}

/// What an ONNX file holds, as far as the encoder needs it.
#[derive(Debug, Default)]
pub struct Graph {
    pub initializers: HashMap<String, Tensor>,
    pub nodes: Vec<Node>,
}

impl Graph {
    /// The node that produces `output`.
    pub fn producer(&self, output: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.outputs.iter().any(|o| o == output))
    }
}

/// Why a file could not be read as an ONNX model.
#[derive(Debug, thiserror::Error)]
#[error("not a readable ONNX model: {0}")]
pub struct OnnxError(String);

impl OnnxError {
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

/// The most dimensions a tensor read may have (the encoder's have one or two).
const MAX_DIMS: usize = 8;

/// Reads the graph of the ONNX model in `bytes`.
pub fn read(bytes: &[u8]) -> Result<Graph, OnnxError> {
    let mut graph = Graph::default();
    let mut found = false;
    for field in Fields(bytes) {
        let (number, value) = field?;
        if number == 7 {
            found = true;
            read_graph(value.bytes()?, &mut graph)?;
        }
    }
    if !found {
        return Err(OnnxError::new("the file has no graph"));
    }
    Ok(graph)
}

fn read_graph(bytes: &[u8], graph: &mut Graph) -> Result<(), OnnxError> {
    for field in Fields(bytes) {
        match field? {
            (1, value) => graph.nodes.push(read_node(value.bytes()?)?),
            (5, value) => {
                let (name, tensor) = read_tensor(value.bytes()?)?;
                if let Some(Stored::Floats(tensor)) = tensor {
                    graph.initializers.insert(name, tensor);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn read_node(bytes: &[u8]) -> Result<Node, OnnxError> {
    let mut node = Node::default();
    for field in Fields(bytes) {
        match field? {
            (1, value) => node.inputs.push(value.text()?),
            (2, value) => node.outputs.push(value.text()?),
            (4, value) => node.op_type = value.text()?,
            (5, value) => {
                for attribute in Fields(value.bytes()?) {
                    if let (5, tensor) = attribute? {
                        node.constant = match read_tensor(tensor.bytes()?)?.1 {
                            Some(Stored::Floats(t)) if t.values.len() == 1 => Some(f64::from(t.values[0])),
                            Some(Stored::Ints(values)) if values.len() == 1 => Some(values[0] as f64),
                            _ => None,
                        };
                    }
                }
            }
            _ => {}
        }
    }
    Ok(node)
}

/// A tensor's values, for the element types the encoder reads.
enum Stored {
    Floats(Tensor),
    Ints(Vec<i64>),
}

const FLOAT: u64 = 1;
const INT64: u64 = 7;

fn read_tensor(bytes: &[u8]) -> Result<(String, Option<Stored>), OnnxError> {
    let mut name = String::new();
    let mut dims = Vec::new();
    let mut data_type = 0;
    let mut raw: &[u8] = &[];
    let mut floats = Vec::new();
    let mut ints = Vec::new();
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(d)) => dims.push(d),
            (1, Value::Bytes(packed)) => dims.extend(varints(packed)?),
            (2, value) => data_type = value.varint()?,
            (4, Value::Bytes(packed)) => floats.extend(
                packed
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            ),
            (4, Value::Fixed32(v)) => floats.push(f32::from_bits(v)),
            (7, Value::Varint(v)) => ints.push(v as i64),
            (7, Value::Bytes(packed)) => ints.extend(varints(packed)?.into_iter().map(|v| v as i64)),
            (8, value) => name = value.text()?,
            (9, value) => raw = value.bytes()?,
            _ => {}
        }
    }
    if dims.len() > MAX_DIMS {
        return Err(OnnxError::new(format!(
            "tensor {name:?} has {} dimensions",
            dims.len()
        )));
    }
    let dims: Vec<usize> = dims
        .into_iter()
        .map(|d| {
            usize::try_from(d).map_err(|_| OnnxError::new(format!("tensor {name:?} has a dimension of {d}")))
        })
        .collect::<Result<_, _>>()?;
    let count = dims
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| OnnxError::new(format!("tensor {name:?} is too large")))?;
    let stored = match data_type {
        FLOAT => {
            if !raw.is_empty() {
                floats = little_endian(raw, f32::from_le_bytes)
                    .ok_or_else(|| OnnxError::new(format!("tensor {name:?}'s data is not whole floats")))?;
            }
            if floats.len() != count {
                return Err(OnnxError::new(format!(
                    "tensor {name:?} holds {} values for its shape {dims:?}",
                    floats.len()
                )));
            }
            Some(Stored::Floats(Tensor { dims, values: floats }))
        }
        INT64 => {
            if !raw.is_empty() {
                ints = little_endian(raw, i64::from_le_bytes)
                    .ok_or_else(|| OnnxError::new(format!("tensor {name:?}'s data is not whole integers")))?;
            }
            Some(Stored::Ints(ints))
        }
        _ => None,
    };
    Ok((name, stored))
}

/// `raw` read as little-endian values of `N` bytes each; `None` if it is not whole values.
fn little_endian<T, const N: usize>(raw: &[u8], from: fn([u8; N]) -> T) -> Option<Vec<T>> {
    if !raw.len().is_multiple_of(N) {
        return None;
    }
    Some(
        raw.chunks_exact(N)
            .map(|bytes| from(bytes.try_into().unwrap_or([0; N])))
            .collect(),
    )
}

/// One field's value on the wire.
enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Value<'a> {
    fn bytes(self) -> Result<&'a [u8], OnnxError> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => Err(OnnxError::new("a message or string field has another wire type")),
        }
    }

    fn text(self) -> Result<String, OnnxError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| OnnxError::new("a name is not UTF-8"))
    }

    fn varint(self) -> Result<u64, OnnxError> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => Err(OnnxError::new("a number field has another wire type")),
        }
    }
}

/// The fields of one message, in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), OnnxError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            self.0 = &[];
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u64, Value<'a>), OnnxError> {
        let key = varint(&mut self.0)?;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut self.0)?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let len = usize::try_from(varint(&mut self.0)?)
                    .map_err(|_| OnnxError::new("a field is longer than memory"))?;
                Value::Bytes(self.take(len)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            other => return Err(OnnxError::new(format!("unknown wire type {other}"))),
        };
        Ok((key >> 3, value))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], OnnxError> {
        if len > self.0.len() {
            return Err(OnnxError::new("the file ends inside a field"));
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }
}

fn varint(bytes: &mut &[u8]) -> Result<u64, OnnxError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some((&byte, rest)) = bytes.split_first() else {
            return Err(OnnxError::new("the file ends inside a number"));
        };
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(OnnxError::new("a number is longer than ten bytes"))
}

fn varints(mut packed: &[u8]) -> Result<Vec<u64>, OnnxError> {
    let mut values = Vec::new();
    while !packed.is_empty() {
        values.push(varint(&mut packed)?);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_bytes(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    fn field(number: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = varint_bytes(number << 3 | 2);
        out.extend(varint_bytes(bytes.len() as u64));
        out.extend(bytes);
        out
    }

    fn number(number: u64, value: u64) -> Vec<u8> {
        let mut out = varint_bytes(number << 3);
        out.extend(varint_bytes(value));
        out
    }

    /// A model whose graph has a 2×2 float initializer `w` and a `Constant` node of 5.5.
    fn tiny_model() -> Vec<u8> {
        let raw: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let tensor = [
            number(1, 2),
            number(1, 2),
            number(2, FLOAT),
            field(8, b"w"),
            field(9, &raw),
        ]
        .concat();
        let scalar = [number(2, FLOAT), field(9, &5.5f32.to_le_bytes())].concat();
        let node = [
            field(2, b"c"),
            field(4, b"Constant"),
            field(5, &[field(1, b"value"), field(5, &scalar)].concat()),
        ]
        .concat();
        let graph = [field(1, &node), field(5, &tensor)].concat();
        [number(1, 8), field(7, &graph)].concat()
    }

    #[test]
    fn weights_and_constants_are_read() {
        let graph = read(&tiny_model()).expect("reads");
        let w = &graph.initializers["w"];
        assert_eq!(
            (w.dims.clone(), w.values.clone()),
            (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])
        );
        let node = graph.producer("c").expect("the constant");
        assert_eq!((node.op_type.as_str(), node.constant), ("Constant", Some(5.5)));
    }

    #[test]
    fn a_cut_or_damaged_file_is_an_error_not_a_panic() {
        let model = tiny_model();
        for end in 0..model.len() {
            // Any prefix either fails or reads as a smaller model; none panics.
            let _ = read(&model[..end]);
        }
        let mut damaged = model.clone();
        damaged[3] = 0x7f; // the graph's length now runs past the end
        assert!(read(&damaged).is_err());
        let wrong_count = [
            number(1, 3),
            number(2, FLOAT),
            field(8, b"w"),
            field(9, &1.0f32.to_le_bytes()),
        ]
        .concat();
        let model = field(7, &field(5, &wrong_count));
        let err = read(&model).expect_err("3 values declared, 1 stored");
        assert!(err.to_string().contains("holds 1 values"), "{err}");
        assert!(read(&[0x0b]).is_err(), "wire type 3 is not used by ONNX");
        assert!(read(&[0xff; 11]).is_err(), "a number longer than ten bytes");
    }
}
