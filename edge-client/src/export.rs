//! One file for runtimes other than ours: the backbone's graph with the saved head and a
//! softmax appended, so `probabilities = export(preprocessed image)`. The input is the
//! backbone's own (`input`, `[N, 3, side, side]`, preprocessed as `model.json` says); the
//! only output is `probabilities`, `[N, classes]`.
//! - ONNX ([`export_onnx`]): the classes, side and preprocessing ride in the file's metadata.
//! - NNEF ([`export_nnef`], what tract and the ARM builds load): the same graph converted
//!   as `edge-client convert-model` converts the backbone (input side symbolic, batch 1), in
//!   a gzipped tar that also holds the model folder's `labels.txt` and `model.json`.

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, ModelProto, NodeProto, StringStringEntryProto, TensorProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
    tensor_proto::DataType,
    tensor_shape_proto::{Dimension, dimension},
    type_proto,
};
use wsa::saved::SavedModel;

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The backbone file is not an ONNX model with one output.
    #[error("{path}: {reason}")]
    Backbone {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Writes `out`: the backbone ONNX (`bytes`, read from `backbone`) followed by `model`'s head
/// and a softmax. The caller has checked that the backbone is one the model names.
pub fn export_onnx(
    backbone: &Path,
    bytes: &[u8],
    model: &SavedModel,
    out: &Path,
) -> Result<(), ExportError> {
    let onnx = onnx_with_head(backbone, bytes, model)?;
    support::fs::write_atomic(out, &onnx).map_err(|source| ExportError::Io {
        path: out.display().to_string(),
        source,
    })
}

/// Writes `out`: [`export_onnx`]'s graph as an NNEF archive, with the model folder's
/// `labels.txt` and `model.json` inside.
pub fn export_nnef(
    backbone: &Path,
    bytes: &[u8],
    model: &SavedModel,
    out: &Path,
) -> Result<(), ExportError> {
    let onnx = onnx_with_head(backbone, bytes, model)?;
    let cards = model.card_files().map_err(|e| ExportError::Backbone {
        path: out.display().to_string(),
        reason: e.to_string(),
    })?;
    let extra: Vec<(&str, &[u8])> = cards.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    crate::backbone::write_nnef(backbone, &onnx, out, &extra).map_err(|e| match e {
        crate::BackboneError::Io { path, source } => ExportError::Io {
            path: path.display().to_string(),
            source,
        },
        other => ExportError::Backbone {
            path: backbone.display().to_string(),
            reason: other.to_string(),
        },
    })
}

/// The backbone ONNX `bytes` with `model`'s head and a softmax appended, encoded.
fn onnx_with_head(
    backbone: &Path,
    bytes: &[u8],
    model: &SavedModel,
) -> Result<Vec<u8>, ExportError> {
    let bad = |reason: String| ExportError::Backbone {
        path: backbone.display().to_string(),
        reason,
    };
    let mut onnx = ModelProto::decode(bytes).map_err(|e| bad(format!("not an ONNX model: {e}")))?;
    let graph = onnx.graph.as_mut().ok_or_else(|| bad("no graph".into()))?;
    let [features] = &graph.output[..] else {
        return Err(bad(format!(
            "{} outputs; the features backbone has one",
            graph.output.len()
        )));
    };
    let mut current = features.name.clone();

    let layers = model.head.layers();
    for (i, layer) in layers.iter().enumerate() {
        let (inputs, outputs) = layer.w.dim();
        let weight = format!("head.{i}.weight");
        let bias = format!("head.{i}.bias");
        // Stored [out, in] with transB, as in the safetensors file.
        graph.initializer.push(float_tensor(
            &weight,
            &[outputs, inputs],
            layer.w.t().iter().copied(),
        ));
        graph
            .initializer
            .push(float_tensor(&bias, &[outputs], layer.b.iter().copied()));
        let gemm_out = format!("head.{i}.gemm");
        graph.node.push(NodeProto {
            input: vec![current, weight, bias],
            output: vec![gemm_out.clone()],
            name: gemm_out.clone(),
            op_type: "Gemm".into(),
            attribute: vec![AttributeProto {
                name: "transB".into(),
                r#type: AttributeType::Int as i32,
                i: 1,
                ..Default::default()
            }],
            ..Default::default()
        });
        current = gemm_out;
        if i + 1 < layers.len() {
            let relu_out = format!("head.{i}.relu");
            graph.node.push(node("Relu", &current, &relu_out));
            current = relu_out;
        }
    }
    graph.node.push(NodeProto {
        attribute: vec![AttributeProto {
            name: "axis".into(),
            r#type: AttributeType::Int as i32,
            i: 1,
            ..Default::default()
        }],
        ..node("Softmax", &current, "probabilities")
    });
    graph.output = vec![ValueInfoProto {
        name: "probabilities".into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(dimension::Value::DimParam("N".into())),
                            ..Default::default()
                        },
                        Dimension {
                            value: Some(dimension::Value::DimValue(model.card.head.classes as i64)),
                            ..Default::default()
                        },
                    ],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let card = &model.card;
    let meta = |key: &str, value: String| StringStringEntryProto {
        key: key.into(),
        value,
    };
    onnx.metadata_props.extend([
        meta(
            "classes",
            serde_json::to_string(&card.classes).unwrap_or_default(),
        ),
        meta("side", card.backbone.side.to_string()),
        meta(
            "preprocessing",
            serde_json::to_string(&card.backbone.preprocessing).unwrap_or_default(),
        ),
        meta(
            "provenance",
            serde_json::to_string(&card.provenance).unwrap_or_default(),
        ),
    ]);
    onnx.producer_name = "wsa-fl edge-client export".into();
    Ok(onnx.encode_to_vec())
}

fn node(op: &str, input: &str, output: &str) -> NodeProto {
    NodeProto {
        input: vec![input.into()],
        output: vec![output.into()],
        name: output.into(),
        op_type: op.into(),
        ..Default::default()
    }
}

fn float_tensor(name: &str, dims: &[usize], values: impl Iterator<Item = f32>) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: values.flat_map(f32::to_le_bytes).collect(),
        ..Default::default()
    }
}
