//! A parser for the UEA/sktime `.ts` time-series format (the format of the UEA & UCR
//! classification archive at timeseriesclassification.com).
//!
//! ```text
//! # comments start with # (or %)
//! @problemName BasicMotions
//! @timeStamps false
//! @missing false
//! @univariate false
//! @dimensions 3
//! @equalLength true
//! @seriesLength 4
//! @classLabel true standing walking
//! @data
//! 0.1,0.2,0.3,0.4:1.0,1.1,1.2,1.3:-1,-2,-3,-4:walking
//! ```
//!
//! Each line after `@data` is one series: channels separated by `:`, values by `,`, and with
//! `@classLabel true` (or `@targetLabel true`, for regression) a last `:` field holding the
//! label. Tag names and boolean values are case-insensitive; labels are case-sensitive.
//!
//! The parser is strict, because a silently misread training set is worse than an error: every
//! error names the line and says how to fix it. Not supported (each is a clear error): missing
//! values (`?`), timestamped values (`@timeStamps true`), values that are not finite 32-bit
//! numbers, and channels of one series with different lengths. Defaults when a tag is absent
//! follow sktime: `@equalLength true`, no labels, and the channel count taken from
//! `@dimensions`, else 1 for `@univariate true`, else the first series.

use std::collections::HashSet;

/// A parsed `.ts` file.
#[derive(Debug, Clone, PartialEq)]
pub struct TsDataset {
    /// `@problemName`, if given.
    pub problem: Option<String>,
    /// Channels per series (every series has exactly this many).
    pub dimensions: usize,
    /// The length shared by every series, or `None` if lengths differ (`@equalLength false`).
    pub series_length: Option<usize>,
    /// The labels declared by `@classLabel true ...`, in declaration order; empty otherwise.
    pub class_labels: Vec<String>,
    /// The series, in file order; never empty.
    pub series: Vec<TsSeries>,
}

/// One multichannel series.
#[derive(Debug, Clone, PartialEq)]
pub struct TsSeries {
    /// `channels[c][t]`: value `t` of channel `c`; every channel has the same length.
    pub channels: Vec<Vec<f32>>,
    /// The class label (one of [`TsDataset::class_labels`]) or the regression target as
    /// written in the file; `None` when the file has no labels.
    pub label: Option<String>,
}

impl TsSeries {
    /// Values per channel.
    pub fn len(&self) -> usize {
        self.channels.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `t` of every channel, or `None` past the end.
    pub fn sample(&self, t: usize) -> Option<Vec<f32>> {
        self.channels.iter().map(|c| c.get(t).copied()).collect()
    }
}

impl TsDataset {
    /// The index of `label` in [`TsDataset::class_labels`] (the class id a classifier predicts).
    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.class_labels.iter().position(|l| l == label)
    }
}

/// What is wrong with a `.ts` file. Line numbers are 1-based; channels are numbered from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TsError {
    #[error(
        "missing @data section: end the header with a line `@data`, then write one series per line"
    )]
    MissingData,
    #[error("the @data section has no series: write one series per line after @data")]
    NoSeries,
    /// A header problem or another syntax error; the message says what to change.
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("line {line}: series has {found} channels but {expected_by} says {expected}{}", channel_hint(*.labelled))]
    ChannelCount {
        line: usize,
        found: usize,
        expected: usize,
        expected_by: String,
        labelled: bool,
    },
    #[error("line {line}: value {value:?} in channel {channel} is not a number")]
    NotANumber {
        line: usize,
        channel: usize,
        value: String,
    },
    #[error(
        "line {line}: value {value:?} in channel {channel} is not a finite 32-bit number: use values within ±3.4e38"
    )]
    NotFinite {
        line: usize,
        channel: usize,
        value: String,
    },
    #[error(
        "line {line}: value {index} of channel {channel} is missing (`?`): missing values are not supported; fill them in or drop the series"
    )]
    MissingValue {
        line: usize,
        channel: usize,
        index: usize,
    },
    #[error("line {line}: channel {channel} is empty: every channel needs at least one value")]
    EmptyChannel { line: usize, channel: usize },
    #[error(
        "line {line}: channel {channel} has {found} values but channel 1 has {expected}: all channels of a series must have the same length"
    )]
    UnequalChannels {
        line: usize,
        channel: usize,
        found: usize,
        expected: usize,
    },
    #[error(
        "line {line}: series has {found} values per channel but {expected_by} says {expected}: fix the series, or declare `@equalLength false` if lengths differ"
    )]
    SeriesLength {
        line: usize,
        found: usize,
        expected: usize,
        expected_by: String,
    },
    #[error(
        "line {line}: class label {label:?} is not declared in @classLabel (declared: {declared}): add it to the @classLabel line or fix the label"
    )]
    UnknownLabel {
        line: usize,
        label: String,
        declared: String,
    },
}

fn channel_hint(labelled: bool) -> &'static str {
    if labelled {
        " (with labels, the last `:`-separated field is the label, not a channel)"
    } else {
        " (if the last field is a class label, declare it with `@classLabel true <labels>`)"
    }
}

fn syntax(line: usize, message: impl Into<String>) -> TsError {
    TsError::Syntax {
        line,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Labels {
    None,
    Class,
    Target,
}

#[derive(Debug, Default)]
struct Header {
    problem: Option<String>,
    univariate: Option<bool>,
    dimensions: Option<usize>,
    equal_length: Option<bool>,
    series_length: Option<usize>,
    class_label: Option<(bool, Vec<String>)>,
    target_label: Option<bool>,
    seen: HashSet<&'static str>,
}

/// Parses the text of a `.ts` file.
pub fn parse_ts(text: &str) -> Result<TsDataset, TsError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut header = Header::default();
    let mut data: Option<DataState> = None;
    let mut series = Vec::new();

    for (idx, raw) in text.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('%') {
            continue;
        }
        if line.starts_with('@') {
            if data.is_some() {
                return Err(syntax(
                    line_no,
                    "header line after @data: move every @ line above @data",
                ));
            }
            if header_line(&mut header, line, line_no)? {
                data = Some(DataState::new(&header, line_no)?);
            }
            continue;
        }
        let Some(state) = data.as_mut() else {
            return Err(syntax(
                line_no,
                "data before @data: put a line `@data` between the header and the series",
            ));
        };
        series.push(state.series(line, line_no)?);
    }

    let Some(state) = data else {
        return Err(TsError::MissingData);
    };
    if series.is_empty() {
        return Err(TsError::NoSeries);
    }
    let first_len = series.first().map_or(0, TsSeries::len);
    let series_length = series
        .iter()
        .all(|s| s.len() == first_len)
        .then_some(first_len);
    Ok(TsDataset {
        problem: header.problem,
        dimensions: state.dimensions.map_or(0, |(d, _)| d),
        series_length,
        class_labels: state.class_labels,
        series,
    })
}

/// Applies one header line; returns `true` for `@data`.
fn header_line(h: &mut Header, line: &str, line_no: usize) -> Result<bool, TsError> {
    let mut tokens = line.split_whitespace();
    let tag_raw = tokens.next().unwrap_or(line);
    let args: Vec<&str> = tokens.collect();
    let tag: &'static str = match tag_raw.to_ascii_lowercase().as_str() {
        "@problemname" => "@problemName",
        "@timestamps" => "@timeStamps",
        "@missing" => "@missing",
        "@univariate" => "@univariate",
        "@dimension" | "@dimensions" => "@dimensions",
        "@equallength" => "@equalLength",
        "@serieslength" => "@seriesLength",
        "@classlabel" | "@classlabels" => "@classLabel",
        "@targetlabel" => "@targetLabel",
        "@data" => "@data",
        _ => {
            return Err(syntax(
                line_no,
                format!(
                    "unknown header tag {tag_raw}: use @problemName, @timeStamps, @missing, @univariate, @dimensions, @equalLength, @seriesLength, @classLabel, @targetLabel or @data"
                ),
            ));
        }
    };
    if !h.seen.insert(tag) {
        return Err(syntax(line_no, format!("{tag} is given twice: keep one")));
    }
    let one_arg = |what: &str| one_arg(&args, tag, what, line_no);
    let bool_arg = |value: &str| -> Result<bool, TsError> {
        match value.to_ascii_lowercase().as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => Err(syntax(
                line_no,
                format!("{tag} must be true or false, not {value:?}"),
            )),
        }
    };
    let count_arg = |value: &str| -> Result<usize, TsError> {
        match value.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(syntax(
                line_no,
                format!("{tag} must be a whole number of at least 1, not {value:?}"),
            )),
        }
    };
    match tag {
        "@problemName" => {
            if args.is_empty() {
                return Err(syntax(
                    line_no,
                    "@problemName needs a name, e.g. `@problemName BasicMotions`",
                ));
            }
            h.problem = Some(args.join(" "));
        }
        "@timeStamps" => {
            if bool_arg(one_arg("true or false")?)? {
                return Err(syntax(
                    line_no,
                    "@timeStamps true is not supported: write the values without timestamps, evenly spaced, and declare @timeStamps false",
                ));
            }
        }
        // Missing values are rejected where they occur, whatever this says.
        "@missing" => {
            bool_arg(one_arg("true or false")?)?;
        }
        "@univariate" => h.univariate = Some(bool_arg(one_arg("true or false")?)?),
        "@dimensions" => h.dimensions = Some(count_arg(one_arg("the number of channels")?)?),
        "@equalLength" => h.equal_length = Some(bool_arg(one_arg("true or false")?)?),
        "@seriesLength" => h.series_length = Some(count_arg(one_arg("the values per channel")?)?),
        "@classLabel" => {
            let Some((first, labels)) = args.split_first() else {
                return Err(syntax(
                    line_no,
                    "@classLabel needs true followed by the labels, or false",
                ));
            };
            let on = bool_arg(first)?;
            if on && labels.is_empty() {
                return Err(syntax(
                    line_no,
                    "@classLabel true must list the class labels, e.g. `@classLabel true standing walking`",
                ));
            }
            if !on && !labels.is_empty() {
                return Err(syntax(
                    line_no,
                    "@classLabel false takes no labels: remove them or write @classLabel true",
                ));
            }
            let mut unique = HashSet::new();
            if let Some(dup) = labels.iter().find(|l| !unique.insert(**l)) {
                return Err(syntax(
                    line_no,
                    format!("class label {dup:?} is declared twice in @classLabel"),
                ));
            }
            h.class_label = Some((on, labels.iter().map(|l| l.to_string()).collect()));
        }
        "@targetLabel" => h.target_label = Some(bool_arg(one_arg("true or false")?)?),
        _ => {
            if !args.is_empty() {
                return Err(syntax(
                    line_no,
                    "@data takes no value: put the series on the lines after it",
                ));
            }
            return Ok(true);
        }
    }
    Ok(false)
}

fn one_arg<'a>(
    args: &[&'a str],
    tag: &str,
    what: &str,
    line_no: usize,
) -> Result<&'a str, TsError> {
    match args {
        [a] => Ok(a),
        _ => Err(syntax(
            line_no,
            format!(
                "{tag} takes exactly one value ({what}), e.g. `{tag} {}`",
                example(tag)
            ),
        )),
    }
}

fn example(tag: &str) -> &'static str {
    match tag {
        "@dimensions" => "6",
        "@seriesLength" => "100",
        _ => "false",
    }
}

/// What the data lines are checked against: the header, then what the first series showed.
struct DataState {
    labels: Labels,
    class_labels: Vec<String>,
    /// Channels per series, and what says so (for error messages).
    dimensions: Option<(usize, String)>,
    equal_length: bool,
    series_length: Option<(usize, String)>,
}

impl DataState {
    fn new(h: &Header, data_line: usize) -> Result<DataState, TsError> {
        let class_on = matches!(h.class_label, Some((true, _)));
        let target_on = h.target_label == Some(true);
        let labels = match (class_on, target_on) {
            (true, true) => {
                return Err(syntax(
                    data_line,
                    "both @classLabel true and @targetLabel true are declared: a file has class labels or regression targets, not both",
                ));
            }
            (true, false) => Labels::Class,
            (false, true) => Labels::Target,
            (false, false) => Labels::None,
        };
        let dimensions = match (h.univariate, h.dimensions) {
            (Some(true), Some(d)) if d != 1 => {
                return Err(syntax(
                    data_line,
                    format!(
                        "@univariate true contradicts @dimensions {d}: declare @univariate false for several channels"
                    ),
                ));
            }
            (_, Some(d)) => Some((d, "@dimensions".to_string())),
            (Some(true), None) => Some((1, "@univariate true".to_string())),
            _ => None,
        };
        let equal_length = h.equal_length.unwrap_or(true);
        let series_length = match h.series_length {
            Some(n) if equal_length => Some((n, "@seriesLength".to_string())),
            _ => None,
        };
        Ok(DataState {
            labels,
            class_labels: h
                .class_label
                .as_ref()
                .map(|(_, l)| l.clone())
                .unwrap_or_default(),
            dimensions,
            equal_length,
            series_length,
        })
    }

    fn series(&mut self, line: &str, line_no: usize) -> Result<TsSeries, TsError> {
        let mut fields: Vec<&str> = line.split(':').collect();
        let label = match self.labels {
            Labels::None => None,
            Labels::Class | Labels::Target => {
                if fields.len() < 2 {
                    return Err(syntax(
                        line_no,
                        "series has no label: with labels declared, end each series with `:<label>`",
                    ));
                }
                fields.pop().map(str::trim)
            }
        };
        let labelled = label.is_some();
        let expected_by_first =
            |found: usize| (found, format!("the first series (line {line_no})"));
        let (dims, dims_by) = self
            .dimensions
            .get_or_insert_with(|| expected_by_first(fields.len()));
        if fields.len() != *dims {
            return Err(TsError::ChannelCount {
                line: line_no,
                found: fields.len(),
                expected: *dims,
                expected_by: dims_by.clone(),
                labelled,
            });
        }

        let mut channels = Vec::with_capacity(fields.len());
        for (c, field) in fields.iter().enumerate() {
            let channel = c + 1;
            let field = field.trim();
            if field.is_empty() {
                return Err(TsError::EmptyChannel {
                    line: line_no,
                    channel,
                });
            }
            let mut values = Vec::with_capacity(channels.first().map_or(0, Vec::len));
            for (i, v) in field.split(',').enumerate() {
                let v = v.trim();
                if v == "?" {
                    return Err(TsError::MissingValue {
                        line: line_no,
                        channel,
                        index: i + 1,
                    });
                }
                if v.starts_with('(') {
                    return Err(syntax(
                        line_no,
                        format!(
                            "channel {channel} has a timestamped value {v:?}: timestamps are not supported; write plain evenly spaced values"
                        ),
                    ));
                }
                let x: f32 = v.parse().map_err(|_| TsError::NotANumber {
                    line: line_no,
                    channel,
                    value: v.to_string(),
                })?;
                if !x.is_finite() {
                    return Err(TsError::NotFinite {
                        line: line_no,
                        channel,
                        value: v.to_string(),
                    });
                }
                values.push(x);
            }
            if let Some(first) = channels.first().map(Vec::len)
                && values.len() != first
            {
                return Err(TsError::UnequalChannels {
                    line: line_no,
                    channel,
                    found: values.len(),
                    expected: first,
                });
            }
            channels.push(values);
        }

        let len = channels.first().map_or(0, Vec::len);
        if self.equal_length {
            let (expected, by) = self
                .series_length
                .get_or_insert_with(|| expected_by_first(len));
            if len != *expected {
                return Err(TsError::SeriesLength {
                    line: line_no,
                    found: len,
                    expected: *expected,
                    expected_by: by.clone(),
                });
            }
        }

        let label = match (self.labels, label) {
            (_, Some("")) => {
                return Err(syntax(line_no, "the label (after the last `:`) is empty"));
            }
            (Labels::Class, Some(l)) if !self.class_labels.iter().any(|d| d == l) => {
                return Err(TsError::UnknownLabel {
                    line: line_no,
                    label: l.to_string(),
                    declared: self.class_labels.join(" "),
                });
            }
            (Labels::Target, Some(l)) if !l.parse::<f64>().is_ok_and(f64::is_finite) => {
                return Err(syntax(
                    line_no,
                    format!("regression target {l:?} (after the last `:`) is not a finite number"),
                ));
            }
            (_, l) => l.map(str::to_string),
        };
        Ok(TsSeries { channels, label })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "# A small IMU set.\n\
        @problemName TinyMotion\n\
        @timeStamps false\n\
        @missing false\n\
        @univariate false\n\
        @dimensions 3\n\
        @equalLength true\n\
        @seriesLength 4\n\
        @classLabel true standing walking running\n\
        @data\n";

    /// A file with HEADER (lines 1-10) and `data` from line 11 on.
    fn with_data(data: &str) -> String {
        format!("{HEADER}{data}")
    }

    fn err(text: &str) -> TsError {
        parse_ts(text).expect_err("the file should be rejected")
    }

    #[test]
    fn parses_a_multivariate_labelled_file() {
        let text = with_data(
            "0.1,0.2,0.3,0.4:1,2,3,4:-1e-3, -2.5 ,3E2,4:walking\r\n\
             \n\
             # a comment between series\n\
             5,6,7,8:9,10,11,12:13,14,15,16:standing\n\
             0,0,0,0:0,0,0,0:0,0,0,0:walking",
        );
        let d = parse_ts(&text).expect("valid file");
        assert_eq!(d.problem.as_deref(), Some("TinyMotion"));
        assert_eq!(d.dimensions, 3);
        assert_eq!(d.series_length, Some(4));
        assert_eq!(d.class_labels, vec!["standing", "walking", "running"]);
        assert_eq!(d.series.len(), 3);
        assert_eq!(
            d.series[0].channels,
            vec![
                vec![0.1, 0.2, 0.3, 0.4],
                vec![1.0, 2.0, 3.0, 4.0],
                vec![-1e-3, -2.5, 300.0, 4.0]
            ]
        );
        assert_eq!(d.series[0].label.as_deref(), Some("walking"));
        assert_eq!(d.series[1].label.as_deref(), Some("standing"));
        assert_eq!(d.series[1].sample(2), Some(vec![7.0, 11.0, 15.0]));
        assert_eq!(d.series[1].sample(4), None);
        assert_eq!(d.series[1].len(), 4);
        assert_eq!(d.label_index("running"), Some(2));
        assert_eq!(d.label_index("flying"), None);
    }

    #[test]
    fn parses_a_univariate_unlabelled_file_with_unequal_lengths() {
        let text = "%comment\n@PROBLEMNAME Gas Prices\n@Univariate TRUE\n@equalLength false\n@classLabel false\n@data\n1,2,3\n4,5\n6\n";
        let d = parse_ts(text).expect("valid file");
        assert_eq!(d.problem.as_deref(), Some("Gas Prices"));
        assert_eq!(d.dimensions, 1);
        assert_eq!(d.series_length, None);
        assert!(d.class_labels.is_empty());
        let lens: Vec<usize> = d.series.iter().map(TsSeries::len).collect();
        assert_eq!(lens, vec![3, 2, 1]);
        assert!(d.series.iter().all(|s| s.label.is_none()));
    }

    #[test]
    fn infers_dimensions_and_length_from_the_first_series() {
        let d = parse_ts("@data\n1,2:3,4\n5,6:7,8\n").expect("valid file");
        assert_eq!(d.dimensions, 2);
        assert_eq!(d.series_length, Some(2));
        let e = err("@data\n1,2:3,4\n5,6:7,8:9,10\n");
        assert!(
            e.to_string()
                .starts_with("line 3: series has 3 channels but the first series (line 2) says 2"),
            "{e}"
        );
        let e = err("@data\n1,2:3,4\n5,6,7:8,9,10\n");
        assert!(
            matches!(
                e,
                TsError::SeriesLength {
                    line: 3,
                    found: 3,
                    expected: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("@equalLength false"), "{e}");
    }

    #[test]
    fn regression_targets_are_kept_as_labels() {
        let d = parse_ts("@dimensions 1\n@targetLabel true\n@data\n1,2:0.5\n3,4:-7\n")
            .expect("valid file");
        let labels: Vec<_> = d.series.iter().map(|s| s.label.clone()).collect();
        assert_eq!(
            labels,
            vec![Some("0.5".to_string()), Some("-7".to_string())]
        );
        let e = err("@dimensions 1\n@targetLabel true\n@data\n1,2:high\n");
        assert!(
            e.to_string()
                .starts_with("line 4: regression target \"high\""),
            "{e}"
        );
    }

    #[test]
    fn channel_count_must_match_dimensions() {
        let e = err(&with_data("1,2,3,4:1,2,3,4:walking\n"));
        assert_eq!(
            e,
            TsError::ChannelCount {
                line: 11,
                found: 2,
                expected: 3,
                expected_by: "@dimensions".into(),
                labelled: true
            }
        );
        assert!(
            e.to_string()
                .starts_with("line 11: series has 2 channels but @dimensions says 3"),
            "{e}"
        );
        // Labels present in the data but not declared: the hint says how to declare them.
        let e = err("@dimensions 2\n@data\n1:2:walking\n");
        assert!(e.to_string().contains("@classLabel true"), "{e}");
        // @univariate true means one channel.
        let e = err("@univariate true\n@data\n1,2:3,4\n");
        assert!(
            e.to_string()
                .starts_with("line 3: series has 2 channels but @univariate true says 1"),
            "{e}"
        );
    }

    #[test]
    fn non_numbers_are_rejected_with_their_channel() {
        let e = err(&with_data("1,2,3,4:1,2,3,4:1,abc,3,4:walking\n"));
        assert_eq!(
            e,
            TsError::NotANumber {
                line: 11,
                channel: 3,
                value: "abc".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "line 11: value \"abc\" in channel 3 is not a number"
        );
        let e = err(&with_data("1,2,3,4:1,,3,4:1,2,3,4:walking\n"));
        assert_eq!(
            e,
            TsError::NotANumber {
                line: 11,
                channel: 2,
                value: String::new()
            }
        );
    }

    #[test]
    fn non_finite_values_are_rejected() {
        for bad in ["NaN", "inf", "-Infinity", "1e39"] {
            let e = err(&with_data(&format!(
                "1,2,3,4:1,2,3,4:1,{bad},3,4:walking\n"
            )));
            assert_eq!(
                e,
                TsError::NotFinite {
                    line: 11,
                    channel: 3,
                    value: bad.into()
                }
            );
        }
    }

    #[test]
    fn missing_values_are_rejected() {
        let e = err(&with_data("1,2,3,4:1,2,?,4:1,2,3,4:walking\n"));
        assert_eq!(
            e,
            TsError::MissingValue {
                line: 11,
                channel: 2,
                index: 3
            }
        );
        assert!(
            e.to_string().contains("missing values are not supported"),
            "{e}"
        );
    }

    #[test]
    fn empty_channels_are_rejected() {
        let e = err(&with_data("1,2,3,4::1,2,3,4:walking\n"));
        assert_eq!(
            e,
            TsError::EmptyChannel {
                line: 11,
                channel: 2
            }
        );
    }

    #[test]
    fn channels_of_a_series_must_have_equal_lengths() {
        let e = err(&with_data("1,2,3,4:1,2,3:1,2,3,4:walking\n"));
        assert_eq!(
            e,
            TsError::UnequalChannels {
                line: 11,
                channel: 2,
                found: 3,
                expected: 4
            }
        );
        assert_eq!(
            e.to_string(),
            "line 11: channel 2 has 3 values but channel 1 has 4: all channels of a series must have the same length"
        );
        // Even when series lengths may differ.
        let e = err("@equalLength false\n@dimensions 2\n@data\n1,2:3\n");
        assert!(matches!(e, TsError::UnequalChannels { line: 4, .. }), "{e}");
    }

    #[test]
    fn series_length_must_match_the_header() {
        let e = err(&with_data("1,2,3,4,5:1,2,3,4,5:1,2,3,4,5:walking\n"));
        assert_eq!(
            e,
            TsError::SeriesLength {
                line: 11,
                found: 5,
                expected: 4,
                expected_by: "@seriesLength".into()
            }
        );
    }

    #[test]
    fn unknown_class_labels_are_rejected() {
        let e = err(&with_data(
            "1,2,3,4:1,2,3,4:1,2,3,4:walking\n1,2,3,4:1,2,3,4:1,2,3,4:flying\n",
        ));
        assert_eq!(
            e,
            TsError::UnknownLabel {
                line: 12,
                label: "flying".into(),
                declared: "standing walking running".into()
            }
        );
        assert!(
            e.to_string().contains("add it to the @classLabel line"),
            "{e}"
        );
        let e = err(&with_data("1,2,3,4:1,2,3,4:1,2,3,4:\n"));
        assert_eq!(
            e.to_string(),
            "line 11: the label (after the last `:`) is empty"
        );
        let e = err("@dimensions 1\n@classLabel true a b\n@data\n1,2,3\n");
        assert!(
            e.to_string().starts_with("line 4: series has no label"),
            "{e}"
        );
    }

    #[test]
    fn data_section_is_required_and_not_empty() {
        assert_eq!(err("@problemName X\n@dimensions 2\n"), TsError::MissingData);
        assert_eq!(err(""), TsError::MissingData);
        assert_eq!(err(&with_data("# nothing here\n\n")), TsError::NoSeries);
        let e = err("@dimensions 1\n1,2,3\n@data\n");
        assert!(
            e.to_string().starts_with("line 2: data before @data"),
            "{e}"
        );
        let e = err("@data\n1,2\n@dimensions 1\n");
        assert!(
            e.to_string().starts_with("line 3: header line after @data"),
            "{e}"
        );
    }

    #[test]
    fn header_errors_name_the_line_and_the_fix() {
        let cases: &[(&str, &str)] = &[
            (
                "@dimensions six\n@data\n1\n",
                "line 1: @dimensions must be a whole number",
            ),
            (
                "@dimensions 0\n@data\n1\n",
                "line 1: @dimensions must be a whole number of at least 1",
            ),
            (
                "@dimensions\n@data\n1\n",
                "line 1: @dimensions takes exactly one value",
            ),
            (
                "@univariate maybe\n@data\n1\n",
                "line 1: @univariate must be true or false",
            ),
            (
                "@seriesLenght 4\n@data\n1\n",
                "line 1: unknown header tag @seriesLenght",
            ),
            (
                "@dimensions 1\n@dimension 1\n@data\n1\n",
                "line 2: @dimensions is given twice",
            ),
            (
                "@classLabel true\n@data\n1\n",
                "line 1: @classLabel true must list the class labels",
            ),
            (
                "@classLabel false a\n@data\n1\n",
                "line 1: @classLabel false takes no labels",
            ),
            (
                "@classLabel true a b a\n@data\n1\n",
                "line 1: class label \"a\" is declared twice",
            ),
            (
                "@timeStamps true\n@data\n1\n",
                "line 1: @timeStamps true is not supported",
            ),
            (
                "@problemName\n@data\n1\n",
                "line 1: @problemName needs a name",
            ),
            ("@data now\n1\n", "line 1: @data takes no value"),
            (
                "@univariate true\n@dimensions 6\n@data\n1\n",
                "line 3: @univariate true contradicts @dimensions 6",
            ),
            (
                "@classLabel true a\n@targetLabel true\n@data\n1:a\n",
                "line 3: both @classLabel true and @targetLabel true",
            ),
            (
                "@data\n(0,1),(1,2)\n",
                "line 2: channel 1 has a timestamped value",
            ),
        ];
        for (text, want) in cases {
            let e = err(text).to_string();
            assert!(
                e.starts_with(want),
                "for {text:?}: got {e:?}, want it to start with {want:?}"
            );
        }
    }

    #[test]
    fn byte_order_mark_and_case_are_tolerated() {
        let d =
            parse_ts("\u{feff}@Dimensions 1\n@CLASSLABEL True Up down\n@DATA\n1,2:Up\n3,4:down\n")
                .expect("valid file");
        assert_eq!(d.class_labels, vec!["Up", "down"]);
        // Labels themselves are case-sensitive.
        let e = err("@dimensions 1\n@classLabel true Up\n@data\n1,2:up\n");
        assert!(matches!(e, TsError::UnknownLabel { .. }), "{e}");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const LABELS: [&str; 3] = ["sit", "stand", "walk"];

        /// One series: its channels and the index of its label in `LABELS`.
        type Series = (Vec<Vec<f32>>, usize);

        /// (dimensions, series), every series of the same length.
        fn dataset() -> impl Strategy<Value = (usize, Vec<Series>)> {
            (1usize..5, 1usize..8, 1usize..6).prop_flat_map(|(dims, len, n)| {
                let channel = proptest::collection::vec(-1e30f32..1e30f32, len);
                let series = (proptest::collection::vec(channel, dims), 0..LABELS.len());
                (Just(dims), proptest::collection::vec(series, n))
            })
        }

        fn write(dims: usize, series: &[Series]) -> String {
            let len = series[0].0[0].len();
            let mut out = format!(
                "@problemName prop\n@univariate {}\n@dimensions {dims}\n@equalLength true\n@seriesLength {len}\n@classLabel true {}\n@data\n",
                dims == 1,
                LABELS.join(" ")
            );
            for (channels, label) in series {
                let fields: Vec<String> = channels
                    .iter()
                    .map(|c| c.iter().map(f32::to_string).collect::<Vec<_>>().join(","))
                    .collect();
                out.push_str(&fields.join(":"));
                out.push(':');
                out.push_str(LABELS[*label]);
                out.push('\n');
            }
            out
        }

        proptest! {
            #[test]
            fn written_datasets_parse_back_exactly((dims, series) in dataset()) {
                let d = parse_ts(&write(dims, &series)).expect("a written dataset parses");
                prop_assert_eq!(d.dimensions, dims);
                prop_assert_eq!(d.series_length, Some(series[0].0[0].len()));
                prop_assert_eq!(d.series.len(), series.len());
                for (got, (channels, label)) in d.series.iter().zip(&series) {
                    prop_assert_eq!(&got.channels, channels);
                    prop_assert_eq!(got.label.as_deref(), Some(LABELS[*label]));
                }
            }

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC*") {
                let _ = parse_ts(&text);
            }

            #[test]
            fn ts_like_text_never_panics(text in "(@(data|dimensions [0-9]|classLabel (true|false)( [ab])*|seriesLength [0-9]|equalLength (true|false))\n|[0-9ab?,:. -]{0,12}\n){0,8}") {
                let _ = parse_ts(&text);
            }
        }
    }
}
