//! The lake's Parquet files: their schemas (one per kind of record), writing rows into one
//! file in memory, and reading a file back (compaction, tests).
//!
//! Schema version [`LAKE_SCHEMA_VERSION`], in each file's key-value metadata as
//! `ember.lake.schema_version` (with `ember.lake.kind`). Within a version columns are only
//! added. The hive partition columns (`kind`, `date`, `device`) are in the path, not in the
//! files, as Spark, BigQuery, Athena and DuckDB expect. Times are
//! `TIMESTAMP(MICROS, UTC)`; `docs/data-lake.md` documents every column.

use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DataType, DoubleType, FloatType, Int32Type, Int64Type,
};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::{SerializedFileWriter, SerializedRowGroupWriter};
use parquet::record::{Field, List, Row, RowAccessor};
use parquet::schema::parser::parse_message_type;

/// The lake's schema version (`ember.lake.schema_version` in every file).
pub const LAKE_SCHEMA_VERSION: u32 = 1;

/// Rows per row group.
const ROW_GROUP: usize = 65_536;

/// What a file holds; its name is the `kind=` partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Telemetry,
    Inference,
    /// Labels given to captured windows, in the order they were given.
    Label,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::Inference => "inference",
            Kind::Label => "label",
        }
    }

    /// From `streams.kind`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "telemetry" => Some(Kind::Telemetry),
            "inference" => Some(Kind::Inference),
            "label" => Some(Kind::Label),
            _ => None,
        }
    }

    fn schema(self) -> &'static str {
        match self {
            Kind::Telemetry => TELEMETRY_SCHEMA,
            Kind::Inference => INFERENCE_SCHEMA,
            Kind::Label => LABEL_SCHEMA,
        }
    }
}

const TELEMETRY_SCHEMA: &str = "
message ember_telemetry {
  required binary stream (STRING);
  required int64 seq;
  required int64 ts (TIMESTAMP(MICROS, true));
  required group values (LIST) {
    repeated group list {
      required float element;
    }
  }
  required int64 received_at (TIMESTAMP(MICROS, true));
}";

const INFERENCE_SCHEMA: &str = "
message ember_inference {
  required binary stream (STRING);
  required int64 seq;
  required int64 ts (TIMESTAMP(MICROS, true));
  required int64 window_start (TIMESTAMP(MICROS, true));
  required int64 source_seq;
  required binary model (STRING);
  required binary version (STRING);
  required int64 latency_us;
  required binary output_kind (STRING);
  optional binary label (STRING);
  optional int32 class;
  optional group probabilities (LIST) {
    repeated group list {
      required float element;
    }
  }
  optional double score;
  optional double threshold;
  required boolean anomalous;
  required int64 received_at (TIMESTAMP(MICROS, true));
  optional group input_mean_z (LIST) {
    repeated group list {
      required float element;
    }
  }
  optional group input_std_ratio (LIST) {
    repeated group list {
      required float element;
    }
  }
  optional binary capture_trigger (STRING);
  optional group capture_window (LIST) {
    repeated group list {
      required float element;
    }
  }
}";

const LABEL_SCHEMA: &str = "
message ember_label {
  required int64 id;
  required binary stream (STRING);
  required int64 seq;
  required binary label (STRING);
  required binary labelled_by (STRING);
  required int64 labelled_at (TIMESTAMP(MICROS, true));
}";

/// One sensor record.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryRow {
    pub stream: String,
    pub seq: i64,
    pub ts: i64,
    pub values: Vec<f32>,
    pub received_at: i64,
}

/// One model result.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRow {
    pub stream: String,
    pub seq: i64,
    pub ts: i64,
    pub window_start: i64,
    pub source_seq: i64,
    pub model: String,
    pub version: String,
    pub latency_us: i64,
    /// `class` or `anomaly`.
    pub output_kind: String,
    pub label: Option<String>,
    pub class: Option<i32>,
    pub probabilities: Option<Vec<f32>>,
    pub score: Option<f64>,
    pub threshold: Option<f64>,
    pub anomalous: bool,
    pub received_at: i64,
    /// The window's per-channel input statistics (model monitoring), when the agent sent them.
    pub input_mean_z: Option<Vec<f32>>,
    pub input_std_ratio: Option<Vec<f32>>,
    /// Capture streams: why the window was captured, and the raw window `[channel][sample]`.
    pub capture_trigger: Option<String>,
    pub capture_window: Option<Vec<f32>>,
}

/// One labelling of a captured window (`capture_labels`); the latest `id` of a (device,
/// stream, seq) is its current label.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelRow {
    pub id: i64,
    /// Not stored in the file (the `device=` partition); kept for splitting.
    pub device: String,
    pub stream: String,
    pub seq: i64,
    pub label: String,
    pub labelled_by: String,
    pub labelled_at: i64,
}

/// The rows of one file, all of one kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    Telemetry(Vec<TelemetryRow>),
    Inference(Vec<InferenceRow>),
    Label(Vec<LabelRow>),
}

impl Rows {
    pub fn empty(kind: Kind) -> Rows {
        match kind {
            Kind::Telemetry => Rows::Telemetry(Vec::new()),
            Kind::Inference => Rows::Inference(Vec::new()),
            Kind::Label => Rows::Label(Vec::new()),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Rows::Telemetry(_) => Kind::Telemetry,
            Rows::Inference(_) => Kind::Inference,
            Rows::Label(_) => Kind::Label,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Rows::Telemetry(r) => r.len(),
            Rows::Inference(r) => r.len(),
            Rows::Label(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(seq, ts)` of each row, in order (labels: `(id, labelled_at)`).
    pub fn keys(&self) -> Vec<(i64, i64)> {
        match self {
            Rows::Telemetry(r) => r.iter().map(|r| (r.seq, r.ts)).collect(),
            Rows::Inference(r) => r.iter().map(|r| (r.seq, r.ts)).collect(),
            Rows::Label(r) => r.iter().map(|r| (r.id, r.labelled_at)).collect(),
        }
    }

    /// Appends `other` (same kind; another kind is ignored).
    pub fn extend(&mut self, other: Rows) {
        match (self, other) {
            (Rows::Telemetry(a), Rows::Telemetry(b)) => a.extend(b),
            (Rows::Inference(a), Rows::Inference(b)) => a.extend(b),
            (Rows::Label(a), Rows::Label(b)) => a.extend(b),
            _ => {}
        }
    }

    /// Sorts by `(stream, seq)` and drops repeated keys.
    pub fn sort_dedup(&mut self) {
        match self {
            Rows::Telemetry(r) => {
                r.sort_by(|a, b| (&a.stream, a.seq).cmp(&(&b.stream, b.seq)));
                r.dedup_by(|a, b| a.stream == b.stream && a.seq == b.seq);
            }
            Rows::Inference(r) => {
                r.sort_by(|a, b| (&a.stream, a.seq).cmp(&(&b.stream, b.seq)));
                r.dedup_by(|a, b| a.stream == b.stream && a.seq == b.seq);
            }
            Rows::Label(r) => {
                r.sort_by_key(|l| l.id);
                r.dedup_by_key(|l| l.id);
            }
        }
    }

    /// Splits into runs of rows with the same UTC day of `ts` (`YYYY-MM-DD`), in order of
    /// first appearance; rows keep their order within a day.
    pub fn split_by_day(self) -> Vec<(String, Rows)> {
        fn split<T>(
            rows: Vec<T>,
            ts: fn(&T) -> i64,
            wrap: fn(Vec<T>) -> Rows,
        ) -> Vec<(String, Rows)> {
            let mut days: Vec<(String, Vec<T>)> = Vec::new();
            for r in rows {
                let day = day_of(ts(&r));
                match days.iter_mut().find(|(d, _)| *d == day) {
                    Some((_, v)) => v.push(r),
                    None => days.push((day, vec![r])),
                }
            }
            days.into_iter().map(|(d, v)| (d, wrap(v))).collect()
        }
        match self {
            Rows::Telemetry(r) => split(r, |r| r.ts, Rows::Telemetry),
            Rows::Inference(r) => split(r, |r| r.ts, Rows::Inference),
            Rows::Label(r) => split(r, |r| r.labelled_at, Rows::Label),
        }
    }

    /// Labels: runs of rows of one device, in order of first appearance (other kinds: one run
    /// under `device`).
    pub fn split_by_device(self, device: &str) -> Vec<(String, Rows)> {
        match self {
            Rows::Label(rows) => {
                let mut out: Vec<(String, Vec<LabelRow>)> = Vec::new();
                for r in rows {
                    match out.iter_mut().find(|(d, _)| *d == r.device) {
                        Some((_, v)) => v.push(r),
                        None => out.push((r.device.clone(), vec![r])),
                    }
                }
                out.into_iter().map(|(d, v)| (d, Rows::Label(v))).collect()
            }
            other => vec![(device.to_string(), other)],
        }
    }
}

/// The UTC day of `ts_us` (microseconds since the epoch) as `YYYY-MM-DD`; times before the
/// epoch fall on 1970-01-01.
pub fn day_of(ts_us: i64) -> String {
    let secs = u64::try_from(ts_us.div_euclid(1_000_000)).unwrap_or(0);
    let t = ember_bundle::format_utc(secs);
    t[..10].to_string()
}

/// Why a file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("parquet: {0}")]
pub struct FormatError(String);

impl From<parquet::errors::ParquetError> for FormatError {
    fn from(e: parquet::errors::ParquetError) -> FormatError {
        FormatError(e.to_string())
    }
}

/// One Parquet file (snappy, statistics on) holding `rows`, with `device` in its metadata.
pub fn write(rows: &Rows, device: &str) -> Result<Vec<u8>, FormatError> {
    let kind = rows.kind();
    let schema = Arc::new(parse_message_type(kind.schema())?);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("ember-fleet {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![
            KeyValue::new(
                "ember.lake.schema_version".into(),
                LAKE_SCHEMA_VERSION.to_string(),
            ),
            KeyValue::new("ember.lake.kind".into(), kind.as_str().to_string()),
            KeyValue::new("ember.lake.device".into(), device.to_string()),
        ]))
        .build();
    let mut w = SerializedFileWriter::new(Vec::new(), schema, Arc::new(props))?;
    match rows {
        Rows::Telemetry(all) => {
            for rows in all.chunks(ROW_GROUP) {
                let mut g = w.next_row_group()?;
                strings(&mut g, rows.iter().map(|r| r.stream.as_str()))?;
                column::<Int64Type>(
                    &mut g,
                    &rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
                    None,
                )?;
                column::<Int64Type>(&mut g, &rows.iter().map(|r| r.ts).collect::<Vec<_>>(), None)?;
                float_lists(
                    &mut g,
                    rows.iter().map(|r| Some(r.values.as_slice())),
                    false,
                )?;
                column::<Int64Type>(
                    &mut g,
                    &rows.iter().map(|r| r.received_at).collect::<Vec<_>>(),
                    None,
                )?;
                g.close()?;
            }
        }
        Rows::Inference(all) => {
            for rows in all.chunks(ROW_GROUP) {
                let mut g = w.next_row_group()?;
                strings(&mut g, rows.iter().map(|r| r.stream.as_str()))?;
                let longs = |f: fn(&InferenceRow) -> i64| rows.iter().map(f).collect::<Vec<_>>();
                column::<Int64Type>(&mut g, &longs(|r| r.seq), None)?;
                column::<Int64Type>(&mut g, &longs(|r| r.ts), None)?;
                column::<Int64Type>(&mut g, &longs(|r| r.window_start), None)?;
                column::<Int64Type>(&mut g, &longs(|r| r.source_seq), None)?;
                strings(&mut g, rows.iter().map(|r| r.model.as_str()))?;
                strings(&mut g, rows.iter().map(|r| r.version.as_str()))?;
                column::<Int64Type>(&mut g, &longs(|r| r.latency_us), None)?;
                strings(&mut g, rows.iter().map(|r| r.output_kind.as_str()))?;
                optional::<ByteArrayType, _>(
                    &mut g,
                    rows.iter().map(|r| {
                        r.label
                            .as_deref()
                            .map(|s| ByteArray::from(s.as_bytes().to_vec()))
                    }),
                )?;
                optional::<Int32Type, _>(&mut g, rows.iter().map(|r| r.class))?;
                float_lists(
                    &mut g,
                    rows.iter().map(|r| r.probabilities.as_deref()),
                    true,
                )?;
                optional::<DoubleType, _>(&mut g, rows.iter().map(|r| r.score))?;
                optional::<DoubleType, _>(&mut g, rows.iter().map(|r| r.threshold))?;
                column::<BoolType>(
                    &mut g,
                    &rows.iter().map(|r| r.anomalous).collect::<Vec<_>>(),
                    None,
                )?;
                column::<Int64Type>(&mut g, &longs(|r| r.received_at), None)?;
                float_lists(&mut g, rows.iter().map(|r| r.input_mean_z.as_deref()), true)?;
                float_lists(
                    &mut g,
                    rows.iter().map(|r| r.input_std_ratio.as_deref()),
                    true,
                )?;
                optional::<ByteArrayType, _>(
                    &mut g,
                    rows.iter().map(|r| {
                        r.capture_trigger
                            .as_deref()
                            .map(|s| ByteArray::from(s.as_bytes().to_vec()))
                    }),
                )?;
                float_lists(
                    &mut g,
                    rows.iter().map(|r| r.capture_window.as_deref()),
                    true,
                )?;
                g.close()?;
            }
        }
        Rows::Label(all) => {
            for rows in all.chunks(ROW_GROUP) {
                let mut g = w.next_row_group()?;
                column::<Int64Type>(&mut g, &rows.iter().map(|r| r.id).collect::<Vec<_>>(), None)?;
                strings(&mut g, rows.iter().map(|r| r.stream.as_str()))?;
                column::<Int64Type>(
                    &mut g,
                    &rows.iter().map(|r| r.seq).collect::<Vec<_>>(),
                    None,
                )?;
                strings(&mut g, rows.iter().map(|r| r.label.as_str()))?;
                strings(&mut g, rows.iter().map(|r| r.labelled_by.as_str()))?;
                column::<Int64Type>(
                    &mut g,
                    &rows.iter().map(|r| r.labelled_at).collect::<Vec<_>>(),
                    None,
                )?;
                g.close()?;
            }
        }
    }
    Ok(w.into_inner()?)
}

type Group<'a> = SerializedRowGroupWriter<'a, Vec<u8>>;

fn column<T: DataType>(
    g: &mut Group<'_>,
    values: &[T::T],
    def: Option<&[i16]>,
) -> Result<(), FormatError> {
    let mut c = g
        .next_column()?
        .ok_or_else(|| FormatError("more columns written than the schema has".into()))?;
    c.typed::<T>().write_batch(values, def, None)?;
    c.close()?;
    Ok(())
}

fn strings<'s>(
    g: &mut Group<'_>,
    values: impl Iterator<Item = &'s str>,
) -> Result<(), FormatError> {
    let v: Vec<ByteArray> = values
        .map(|s| ByteArray::from(s.as_bytes().to_vec()))
        .collect();
    column::<ByteArrayType>(g, &v, None)
}

fn optional<T: DataType, I: Iterator<Item = Option<T::T>>>(
    g: &mut Group<'_>,
    values: I,
) -> Result<(), FormatError> {
    let mut present = Vec::new();
    let mut def = Vec::new();
    for v in values {
        match v {
            Some(v) => {
                present.push(v);
                def.push(1);
            }
            None => def.push(0),
        }
    }
    column::<T>(g, &present, Some(&def))
}

/// A `LIST<float>` column: required (`nullable` false: max definition level 1) or optional
/// (max definition level 2).
fn float_lists<'s>(
    g: &mut Group<'_>,
    lists: impl Iterator<Item = Option<&'s [f32]>>,
    nullable: bool,
) -> Result<(), FormatError> {
    let top = i16::from(nullable);
    let (mut values, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
    for list in lists {
        match list {
            None => {
                def.push(0);
                rep.push(0);
            }
            Some([]) => {
                def.push(top);
                rep.push(0);
            }
            Some(items) => {
                for (i, v) in items.iter().enumerate() {
                    values.push(*v);
                    def.push(top + 1);
                    rep.push(i16::from(i > 0));
                }
            }
        }
    }
    let mut c = g
        .next_column()?
        .ok_or_else(|| FormatError("more columns written than the schema has".into()))?;
    c.typed::<FloatType>()
        .write_batch(&values, Some(&def), Some(&rep))?;
    c.close()?;
    Ok(())
}

/// Reads a file this module wrote (any kind); refuses another schema version.
pub fn read(bytes: Vec<u8>) -> Result<Rows, FormatError> {
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes))?;
    let meta = reader.metadata().file_metadata();
    let kv = |key: &str| {
        meta.key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == key))
            .and_then(|k| k.value.clone())
    };
    let version = kv("ember.lake.schema_version").unwrap_or_default();
    if version != LAKE_SCHEMA_VERSION.to_string() {
        return Err(FormatError(format!(
            "lake schema version {version:?}; this build reads {LAKE_SCHEMA_VERSION}"
        )));
    }
    let kind = kv("ember.lake.kind")
        .as_deref()
        .and_then(Kind::parse)
        .ok_or_else(|| FormatError("no ember.lake.kind in the file's metadata".into()))?;
    let device = kv("ember.lake.device").unwrap_or_default();
    let mut rows = Rows::empty(kind);
    for row in reader.get_row_iter(None)? {
        let row = row?;
        match &mut rows {
            Rows::Telemetry(out) => out.push(TelemetryRow {
                stream: row.get_string(0)?.clone(),
                seq: row.get_long(1)?,
                ts: row.get_timestamp_micros(2)?,
                values: floats(row.get_list(3)?)?,
                received_at: row.get_timestamp_micros(4)?,
            }),
            Rows::Inference(out) => out.push(InferenceRow {
                stream: row.get_string(0)?.clone(),
                seq: row.get_long(1)?,
                ts: row.get_timestamp_micros(2)?,
                window_start: row.get_timestamp_micros(3)?,
                source_seq: row.get_long(4)?,
                model: row.get_string(5)?.clone(),
                version: row.get_string(6)?.clone(),
                latency_us: row.get_long(7)?,
                output_kind: row.get_string(8)?.clone(),
                label: opt(&row, 9, |r, i| r.get_string(i).cloned())?,
                class: opt(&row, 10, |r, i| r.get_int(i))?,
                probabilities: opt_floats(&row, 11)?,
                score: opt(&row, 12, |r, i| r.get_double(i))?,
                threshold: opt(&row, 13, |r, i| r.get_double(i))?,
                anomalous: row.get_bool(14)?,
                received_at: row.get_timestamp_micros(15)?,
                input_mean_z: opt_floats(&row, 16)?,
                input_std_ratio: opt_floats(&row, 17)?,
                capture_trigger: opt(&row, 18, |r, i| r.get_string(i).cloned())?,
                capture_window: opt_floats(&row, 19)?,
            }),
            Rows::Label(out) => out.push(LabelRow {
                id: row.get_long(0)?,
                device: device.clone(),
                stream: row.get_string(1)?.clone(),
                seq: row.get_long(2)?,
                label: row.get_string(3)?.clone(),
                labelled_by: row.get_string(4)?.clone(),
                labelled_at: row.get_timestamp_micros(5)?,
            }),
        }
    }
    Ok(rows)
}

fn opt<T>(
    row: &Row,
    i: usize,
    get: impl Fn(&Row, usize) -> parquet::errors::Result<T>,
) -> Result<Option<T>, FormatError> {
    if row.is_null(i)? {
        Ok(None)
    } else {
        Ok(Some(get(row, i)?))
    }
}

fn opt_floats(row: &Row, i: usize) -> Result<Option<Vec<f32>>, FormatError> {
    match opt(row, i, |r, i| r.get_list(i).cloned())? {
        Some(l) => Ok(Some(floats(&l)?)),
        None => Ok(None),
    }
}

fn floats(list: &List) -> Result<Vec<f32>, FormatError> {
    list.elements()
        .iter()
        .map(|f| match f {
            Field::Float(v) => Ok(*v),
            other => Err(FormatError(format!(
                "a list element is {other:?}, not a float"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry() -> Rows {
        Rows::Telemetry(vec![
            TelemetryRow {
                stream: "imu".into(),
                seq: 1,
                ts: 1_765_000_000_000_000,
                values: vec![1.0, -2.5, 3.25],
                received_at: 1_765_000_000_100_000,
            },
            TelemetryRow {
                stream: "imu".into(),
                seq: 2,
                ts: 1_765_000_000_010_000,
                values: vec![],
                received_at: 1_765_000_000_110_000,
            },
        ])
    }

    fn inference() -> Rows {
        Rows::Inference(vec![
            InferenceRow {
                stream: "imu.activity".into(),
                seq: 7,
                ts: 2,
                window_start: 1,
                source_seq: 100,
                model: "activity".into(),
                version: "1.0.0".into(),
                latency_us: 25,
                output_kind: "class".into(),
                label: Some("Walking".into()),
                class: Some(2),
                probabilities: Some(vec![0.1, 0.2, 0.6, 0.1]),
                score: None,
                threshold: None,
                anomalous: false,
                received_at: 3,
                input_mean_z: Some(vec![0.5, -0.25]),
                input_std_ratio: Some(vec![1.0, 0.0]),
                capture_trigger: Some("low_confidence".into()),
                capture_window: Some(vec![1.0, 2.0, 3.0, 4.0]),
            },
            InferenceRow {
                stream: "imu.anomaly".into(),
                seq: 8,
                ts: 4,
                window_start: 3,
                source_seq: 101,
                model: "anomaly".into(),
                version: "1.0.1".into(),
                latency_us: 30,
                output_kind: "anomaly".into(),
                label: None,
                class: None,
                probabilities: None,
                score: Some(0.75),
                threshold: Some(0.5),
                anomalous: true,
                received_at: 5,
                input_mean_z: None,
                input_std_ratio: None,
                capture_trigger: None,
                capture_window: None,
            },
        ])
    }

    fn labels() -> Rows {
        Rows::Label(vec![LabelRow {
            id: 3,
            device: "d".into(),
            stream: "imu.activity.capture".into(),
            seq: 9,
            label: "Walking".into(),
            labelled_by: "token 2 (alice)".into(),
            labelled_at: 1_765_000_000_000_000,
        }])
    }

    #[test]
    fn every_kind_round_trips() {
        for rows in [
            telemetry(),
            inference(),
            labels(),
            Rows::empty(Kind::Telemetry),
        ] {
            let bytes = write(&rows, "d").unwrap();
            assert_eq!(&bytes[..4], b"PAR1");
            assert_eq!(read(bytes).unwrap(), rows);
        }
    }

    #[test]
    fn writing_is_deterministic() {
        // A restarted export writes the same file under the same name.
        assert_eq!(
            write(&inference(), "d").unwrap(),
            write(&inference(), "d").unwrap()
        );
    }

    #[test]
    fn days_are_utc() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(-5), "1970-01-01");
        assert_eq!(day_of(951_782_400_000_000), "2000-02-29");
        assert_eq!(day_of(1_735_689_599_999_999), "2024-12-31");
        let days = telemetry().split_by_day();
        assert_eq!(days.len(), 1);
        assert_eq!(days[0].0, "2025-12-06");
    }
}
