//! The control state file, replaced atomically (temporary file, rename) so that a crash leaves
//! either the old state or the new one, never a torn file.
//!
//! A change is written before the command that made it is answered, so it survives the hub
//! process dying at any moment. Flushing it to the disk (fsync of the file and the directory)
//! takes most of a millisecond, which would be most of a command's round trip, so [`Store::sync`]
//! runs right after, in the background: only a power loss within those milliseconds can lose
//! the last change.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::layer::Layer;
use crate::error::{Error, Result};

/// The state of a hub that runs alone.
pub const FILE_NAME: &str = "control.json";
/// A clustered hub's copy of the cluster's state, used until NATS answers after a restart.
pub const CLUSTER_FILE_NAME: &str = "cluster-control.json";
pub const FORMAT: u32 = 1;

/// What survives a hub restart: the version counter and the operators' changes.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: u32,
    /// The last version handed out.
    pub version: u64,
    pub global: Layer,
    pub pools: BTreeMap<String, Layer>,
    pub workers: BTreeMap<String, Layer>,
    /// Label levels by canonical text (`zone=a,rack=3`); absent from older files.
    #[serde(
        default,
        with = "super::labels::by_text",
        skip_serializing_if = "super::labels::by_text::is_empty"
    )]
    pub labels: super::labels::LabelLevels,
}

/// The state file inside a state directory.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
}

impl Store {
    /// Uses `file_name` in `dir`, creating `dir` when missing.
    pub fn open(dir: &Path, file_name: &str) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|source| Error::StateWrite {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            path: dir.join(file_name),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored snapshot; an empty one when there is no file yet.
    pub fn load(&self) -> Result<Snapshot> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Snapshot {
                    format: FORMAT,
                    ..Snapshot::default()
                });
            }
            Err(e) => {
                return Err(Error::StateRead {
                    path: self.path.clone(),
                    message: e.to_string(),
                });
            }
        };
        let snapshot: Snapshot = serde_json::from_str(&text).map_err(|e| Error::StateRead {
            path: self.path.clone(),
            message: format!("{e} (move the file away to start from config.toml alone)"),
        })?;
        if snapshot.format != FORMAT {
            return Err(Error::StateRead {
                path: self.path.clone(),
                message: format!(
                    "format {} is not supported (this hub reads format {FORMAT})",
                    snapshot.format
                ),
            });
        }
        Ok(snapshot)
    }

    /// Replaces the file with `snapshot`, atomically; call [`Store::sync`] to make it durable.
    pub fn save(&self, snapshot: &Snapshot) -> Result<()> {
        let write_error = |source| Error::StateWrite {
            path: self.path.clone(),
            source,
        };
        let mut bytes = serde_json::to_vec_pretty(snapshot).map_err(|e| write_error(e.into()))?;
        bytes.push(b'\n');
        let tmp = self.path.with_extension("json.tmp");
        let mut file = File::create(&tmp).map_err(write_error)?;
        file.write_all(&bytes).map_err(write_error)?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(write_error)
    }

    /// Flushes the file and its directory entry to the disk.
    pub fn sync(&self) -> Result<()> {
        let sync_error = |source| Error::StateWrite {
            path: self.path.clone(),
            source,
        };
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(sync_error)?;
        if let Some(dir) = self.path.parent() {
            // The rename is durable only once the directory entry is.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(sync_error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bridge_proto::sampling::Rate;

    use crate::control::layer::Setting;

    #[test]
    fn round_trips_and_reports_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("nested"), FILE_NAME).unwrap();
        assert_eq!(store.load().unwrap().version, 0);

        let mut snapshot = Snapshot {
            format: FORMAT,
            version: 9,
            ..Default::default()
        };
        snapshot.workers.insert(
            "gpu-3".into(),
            Layer {
                sampling_rate: Some(Setting::new(Rate::new(0.1).unwrap(), 9)),
                version: 9,
                ..Default::default()
            },
        );
        store.save(&snapshot).unwrap();
        assert_eq!(store.load().unwrap(), snapshot);
        assert!(!store.path().with_extension("json.tmp").exists());

        fs::write(store.path(), "{ not json").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("control.json") && err.contains("move the file away"),
            "{err}"
        );
    }

    /// Files written before label levels load (no `labels`), and are written back without it.
    #[test]
    fn files_without_label_levels_still_load_and_label_levels_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FILE_NAME).unwrap();
        let old =
            r#"{"format": 1, "version": 4, "global": {"version": 0}, "pools": {}, "workers": {}}"#;
        fs::write(store.path(), old).unwrap();
        let mut snapshot = store.load().unwrap();
        assert!(snapshot.labels.is_empty());
        store.save(&snapshot).unwrap();
        assert!(!fs::read_to_string(store.path()).unwrap().contains("labels"));

        let set = bridge_proto::labels::LabelSet::parse_items(["zone=a,b", "rack=3"]).unwrap();
        snapshot.labels.insert(
            set,
            Layer {
                version: 5,
                ..Default::default()
            },
        );
        store.save(&snapshot).unwrap();
        assert!(
            fs::read_to_string(store.path())
                .unwrap()
                .contains(r#""rack=3,zone=a%2Cb""#)
        );
        assert_eq!(store.load().unwrap(), snapshot);
        fs::write(
            store.path(),
            old.replace(
                r#""workers": {}"#,
                r#""workers": {}, "labels": {"Zone=a": {"version": 1}}"#,
            ),
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains(r#"labels."Zone=a": label key"#), "{err}");
    }

    #[test]
    fn a_level_that_does_not_validate_is_a_load_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), FILE_NAME).unwrap();
        let pool = r#"{"filter": {"value": {"allow": ["gpu..util"], "block": []}, "version": 4},
                       "version": 4}"#;
        let text = format!(
            r#"{{"format": 1, "version": 4, "global": {{"version": 0}},
                 "pools": {{"llama": {pool}}}, "workers": {{}}}}"#
        );
        fs::write(store.path(), text).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("control.json")
                && err.contains("filter.allow[0]: `gpu..util` has an empty token")
                && err.contains("move the file away"),
            "{err}"
        );
    }
}
