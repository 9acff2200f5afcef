//! The workload config's `config.sail` shape, field for field as the seed API shows it. The
//! control plane validates and stores it; the runtime provisions from it.
//!
//! `extraEnv` is rendered in the seed as `{"additionalProperties": {"type", "value"}}`, the
//! OpenAPI way of saying "a map whose values are `{type, value}` objects", so it is a map from
//! variable name to `{"type": "string", "value": "…"}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Execution modes a notebook's Sail server can run in.
pub const EXECUTION_MODES: &[&str] = &["local", "local-cluster", "kubernetes-cluster"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    pub sail: SailConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SailConfig {
    /// `local` (one Sail process), `local-cluster` or `kubernetes-cluster` (workers as pods, up
    /// to `compute.worker.maxNodes`). Default `local`.
    #[serde(default = "default_mode")]
    pub execution_mode: String,
    /// Start attempts before the notebook is `failed`. Default 3.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    #[serde(default)]
    pub compute: Compute,
    /// Image of the Sail pods (Kubernetes runtime). Optional.
    #[serde(default)]
    pub lakesail_image_uri: Option<String>,
    /// Extra Python packages for the notebook's kernel.
    #[serde(default)]
    pub libraries: Vec<Library>,
    /// Extra environment variables for the notebook's kernel and Sail server.
    #[serde(default)]
    pub extra_env: BTreeMap<String, EnvValue>,
}

fn default_mode() -> String {
    "local".into()
}
fn default_retries() -> u32 {
    3
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Compute {
    #[serde(default)]
    pub driver: Driver,
    #[serde(default)]
    pub worker: Worker,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Driver {
    /// Node instance type (a `node.kubernetes.io/instance-type` node selector). Optional.
    #[serde(default)]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub ebs_config: Option<EbsConfig>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Worker {
    #[serde(default)]
    pub instance_type: Option<String>,
    #[serde(default)]
    pub ebs_config: Option<EbsConfig>,
    /// Most Sail workers at once (cluster modes). Default 1.
    #[serde(default = "default_nodes")]
    pub max_nodes: u32,
    /// `on-demand` (default) or `spot`.
    #[serde(default = "default_capacity")]
    pub capacity_type: String,
}

impl Default for Worker {
    fn default() -> Self {
        Worker {
            instance_type: None,
            ebs_config: None,
            max_nodes: 1,
            capacity_type: default_capacity(),
        }
    }
}

fn default_nodes() -> u32 {
    1
}
fn default_capacity() -> String {
    "on-demand".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EbsConfig {
    pub volume_type: String,
    /// GiB.
    pub volume_size: u32,
    #[serde(default)]
    pub iops: Option<u32>,
    /// MiB/s.
    #[serde(default)]
    pub throughput: Option<u32>,
    #[serde(default = "yes")]
    pub delete_on_termination: bool,
}

fn yes() -> bool {
    true
}

/// One library: exactly one of `pypi`, `requirements`, `whl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Library {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pypi: Option<PypiLibrary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements: Option<RequirementsLibrary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whl: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PypiLibrary {
    /// A pip requirement (`polars==1.2`).
    pub package: String,
    /// Index URL. Optional.
    #[serde(default)]
    pub repo: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequirementsLibrary {
    /// `inline` (uri holds the file's text) or `file` (uri is a path or URL).
    pub source: String,
    pub uri: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvValue {
    /// `string` is the only type so far.
    #[serde(rename = "type", default = "string_type")]
    pub kind: String,
    pub value: String,
}

fn string_type() -> String {
    "string".into()
}

/// A field that failed validation and why (`field` is the JSON path, `config.sail.maxRetries`).
#[derive(Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl SailConfig {
    /// Checks what types alone cannot. Field paths are relative to the workload config body.
    pub fn validate(&self) -> Result<(), FieldError> {
        let err = |field: &str, message: &str| {
            Err(FieldError {
                field: format!("config.sail.{field}"),
                message: message.into(),
            })
        };
        if !EXECUTION_MODES.contains(&self.execution_mode.as_str()) {
            return err(
                "executionMode",
                "must be one of local, local-cluster, kubernetes-cluster",
            );
        }
        if self.max_retries == 0 || self.max_retries > 10 {
            return err("maxRetries", "must be between 1 and 10");
        }
        if self.compute.worker.max_nodes == 0 || self.compute.worker.max_nodes > 1000 {
            return err("compute.worker.maxNodes", "must be between 1 and 1000");
        }
        if !["on-demand", "spot"].contains(&self.compute.worker.capacity_type.as_str()) {
            return err("compute.worker.capacityType", "must be on-demand or spot");
        }
        if self.libraries.len() > 100 {
            return err("libraries", "at most 100 entries");
        }
        for (i, lib) in self.libraries.iter().enumerate() {
            let n = lib.pypi.is_some() as u8
                + lib.requirements.is_some() as u8
                + lib.whl.is_some() as u8;
            if n != 1 {
                return err(
                    &format!("libraries[{i}]"),
                    "must have exactly one of pypi, requirements, whl",
                );
            }
            if let Some(p) = &lib.pypi {
                if p.package.trim().is_empty()
                    || p.package.len() > 200
                    || p.package.starts_with('-')
                {
                    return err(
                        &format!("libraries[{i}].pypi.package"),
                        "must be a package requirement",
                    );
                }
            }
            if let Some(r) = &lib.requirements {
                if !["inline", "file"].contains(&r.source.as_str()) {
                    return err(
                        &format!("libraries[{i}].requirements.source"),
                        "must be inline or file",
                    );
                }
            }
        }
        if self.extra_env.len() > 100 {
            return err("extraEnv", "at most 100 variables");
        }
        for (k, v) in &self.extra_env {
            let valid = !k.is_empty()
                && k.len() <= 128
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !valid {
                return err(
                    &format!("extraEnv.{k}"),
                    "variable names are letters, digits and _",
                );
            }
            if v.kind != "string" {
                return err(&format!("extraEnv.{k}.type"), "must be string");
            }
            if v.value.len() > 4096 {
                return err(&format!("extraEnv.{k}.value"), "at most 4096 bytes");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_example_parses() {
        let json = r#"{"sail":{"executionMode":"local","maxRetries":3,"compute":{"driver":{"instanceType":"c8g.2xlarge","ebsConfig":{"volumeType":"gp3","volumeSize":100,"iops":3000,"throughput":125,"deleteOnTermination":true}},"worker":{"instanceType":"c8g.4xlarge","ebsConfig":{"volumeType":"gp3","volumeSize":100,"iops":3000,"throughput":125,"deleteOnTermination":true},"maxNodes":4,"capacityType":"on-demand"}},"lakesailImageUri":"img","libraries":[{"pypi":{"package":"polars","repo":null}}],"extraEnv":{"FOO":{"type":"string","value":"bar"}}}}"#;
        let w: WorkloadSpec = serde_json::from_str(json).unwrap();
        w.sail.validate().unwrap();
        assert_eq!(w.sail.compute.worker.max_nodes, 4);
    }

    #[test]
    fn minimal_and_invalid() {
        let w: WorkloadSpec = serde_json::from_str(r#"{"sail":{}}"#).unwrap();
        w.sail.validate().unwrap();
        let mut bad = w.sail.clone();
        bad.max_retries = 0;
        assert_eq!(bad.validate().unwrap_err().field, "config.sail.maxRetries");
        assert!(serde_json::from_str::<WorkloadSpec>(r#"{"sail":{"bogus":1}}"#).is_err());
        let mut bad = w.sail;
        bad.extra_env.insert(
            "1X".into(),
            EnvValue {
                kind: "string".into(),
                value: "v".into(),
            },
        );
        assert_eq!(bad.validate().unwrap_err().field, "config.sail.extraEnv.1X");
    }
}
