//! Expanding `foreach`/`matrix` families into concrete stages named `family@item`, with
//! `${item}`, `${key}`, `${index}` and `${prev}` substituted.

use super::*;

/// One item of a family.
pub(super) struct Item {
    suffix: String,
    value: Value,
    key: Option<String>,
}

pub(super) fn expand_stage(
    source: &Arc<Source>,
    base_dir: &Path,
    name: &str,
    spec: &serde_yaml::Value,
    _params: &Value,
    pipeline: &mut Pipeline,
) -> Result<(), PipelineError> {
    let line = source.stage_lines.get(name).copied();
    let err = |msg: String| PipelineError::new(&source.file, msg).at(line).stage(name);
    if !valid_stage_name(name) {
        return Err(err(format!("invalid stage name `{}`", crate::text::visible_line(name))).hint(
            "a stage name is letters, digits, `_` and `-`, and does not start with `-` (`@` is reserved for family items, `.` for ports)",
        ));
    }
    let serde_yaml::Value::Mapping(spec) = spec else {
        return Err(err(
            "a stage is a mapping with `uses:` (and `with:`, `inputs:`, ...)".into(),
        ));
    };
    let mut fields: BTreeMap<String, Value> = BTreeMap::new();
    for (k, v) in spec {
        let k = key_str(source, k, &["stages", name])?;
        if !STAGE_KEYS.contains(&k.as_str()) {
            return Err(
                PipelineError::new(&source.file, format!("unknown stage field `{k}`"))
                    .at(key_line(&source.text, &["stages", name, &k]).or(line))
                    .stage(name)
                    .hint(suggest_hint(&k, STAGE_KEYS)),
            );
        }
        fields.insert(k, to_json(&source.file, v.clone())?);
    }
    let uses = match fields.get("uses") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(err("`uses:` must be a stage kind name".into())),
        None => {
            return Err(err("missing `uses:`".into())
                .hint("name the stage kind, e.g. `uses: shell`; `fpipe stages` lists the kinds"))
        }
    };
    let with = match fields.get("with") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(err(
                "`with:` must be a mapping of parameter names to values".into(),
            ))
        }
    };
    let inputs_raw: Vec<(String, Value)> = match fields.get("inputs") {
        None | Some(Value::Null) => vec![],
        Some(Value::Object(m)) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Some(_) => {
            return Err(
                err("`inputs:` must map port names to `stage` or `stage.port`".into())
                    .hint("for example `inputs: {model: train.model}`"),
            )
        }
    };
    let mut resources = parse_resources(fields.get("resources")).map_err(err)?;
    resources.retries = parse_retries(fields.get("retries")).map_err(err)?;

    let items: Option<Vec<Item>> = match (fields.get("foreach"), fields.get("matrix")) {
        (Some(_), Some(_)) => {
            return Err(err("use either `foreach:` or `matrix:`, not both".into()))
        }
        (Some(f), None) => Some(foreach_items(f, room(pipeline)).map_err(err)?),
        (None, Some(m)) => Some(matrix_items(m, room(pipeline)).map_err(err)?),
        (None, None) => None,
    };

    let Some(items) = items else {
        let inputs = inputs_raw
            .into_iter()
            .map(|(p, v)| match v {
                Value::String(s) => Ok((p, s)),
                _ => Err(err(format!(
                    "input `{p}` must be a reference like `stage` or `stage.port`"
                ))),
            })
            .collect::<Result<_, _>>()?;
        if room(pipeline) == 0 {
            return Err(err(too_many_stages()));
        }
        pipeline.stages.push(StageDef {
            name: name.to_string(),
            family: None,
            uses,
            with,
            inputs,
            resources,
            source: source.clone(),
            line,
            base_dir: base_dir.to_path_buf(),
        });
        return Ok(());
    };
    if items.is_empty() {
        pipeline.families.insert(name.to_string(), vec![]);
        return Ok(());
    }
    let mut instances = Vec::new();
    let mut seen = HashSet::new();
    for (idx, item) in items.iter().enumerate() {
        let inst = format!("{name}@{}", item.suffix);
        if !valid_name(&item.suffix) {
            return Err(err(format!(
                "item `{}` cannot be part of a stage name",
                item.suffix
            ))
            .hint("items used for names may hold letters, digits, `_`, `-`, `.`, `=`, `+`"));
        }
        if !seen.insert(inst.clone()) {
            return Err(err(format!("two items give the same stage name `{inst}`")));
        }
        let prev = idx
            .checked_sub(1)
            .map(|p| format!("{name}@{}", items[p].suffix));
        let vars = Vars {
            item: &item.value,
            key: item.key.as_deref(),
            index: idx + 1,
            prev: prev.as_deref(),
        };
        let with_v = substitute(&Value::Object(with.clone()), &vars).map_err(&err)?;
        let with_i = match with_v {
            Value::Object(m) => m,
            _ => Map::new(), // substitution maps objects to objects
        };
        let mut inputs = Vec::new();
        for (port, v) in &inputs_raw {
            let Value::String(s) = v else {
                return Err(err(format!(
                    "input `{port}` must be a reference like `stage` or `stage.port`"
                )));
            };
            if s.contains("${prev}") && prev.is_none() {
                continue; // the first item has no previous one: the port stays unconnected
            }
            match substitute(&Value::String(s.clone()), &vars).map_err(&err)? {
                Value::String(r) => inputs.push((port.clone(), r)),
                other => inputs.push((port.clone(), other.to_string())),
            }
        }
        pipeline.stages.push(StageDef {
            name: inst.clone(),
            family: Some(name.to_string()),
            uses: uses.clone(),
            with: with_i,
            inputs,
            resources,
            source: source.clone(),
            line,
            base_dir: base_dir.to_path_buf(),
        });
        instances.push(inst);
    }
    pipeline.families.insert(name.to_string(), instances);
    Ok(())
}

/// The most stages one pipeline may expand to. Far above any real experiment (the seed
/// pipelines have tens), low enough that planning a hostile `foreach: 100000000000` fails at
/// once instead of allocating until the machine runs out of memory.
pub const MAX_STAGES: usize = 20_000;

/// How many more stages the pipeline may grow by.
pub(super) fn room(pipeline: &Pipeline) -> usize {
    MAX_STAGES.saturating_sub(pipeline.stages.len())
}

pub(super) fn too_many_stages() -> String {
    format!("the pipeline expands to more than {MAX_STAGES} stages")
}

pub(super) fn parse_resources(v: Option<&Value>) -> Result<Resources, String> {
    let mut r = Resources::default();
    let Some(v) = v else { return Ok(r) };
    let Value::Object(m) = v else {
        return Err(
            "`resources:` must be a mapping like {gpu: 1, cpu: 2, mem: 16G, time: 4h}".into(),
        );
    };
    for (k, v) in m {
        match k.as_str() {
            "mem" | "memory" => r.mem_mb = parse_mem(v)?,
            "time" => r.time_s = parse_time(v)?,
            _ => {
                let n = v
                    .as_u64()
                    .ok_or_else(|| format!("resource `{k}` must be a whole number"))?
                    as usize;
                match k.as_str() {
                    "gpu" | "gpus" => r.gpu = n,
                    "cpu" | "cpus" | "jobs" => r.cpu = n,
                    other => {
                        return Err(format!(
                            "unknown resource `{other}` (known: cpu, gpu, mem, time)"
                        ))
                    }
                }
            }
        }
    }
    Ok(r)
}

/// `retries: N`, a whole number up to 100.
pub(super) fn parse_retries(v: Option<&Value>) -> Result<Option<u32>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= 100 => Ok(Some(n as u32)),
            _ => Err(format!(
                "`retries:` must be a whole number from 0 to 100, not {v}"
            )),
        },
    }
}

/// `mem: 32G` (or `500M`, `1T`, `2048` in MiB as Slurm reads it) in MiB.
pub(super) fn parse_mem(v: &Value) -> Result<u64, String> {
    let bad = || format!("resource `mem` must be a size like 512M, 32G or 1T, not {v}");
    let s = match v {
        Value::Number(n) => return n.as_u64().filter(|n| *n > 0).ok_or_else(bad),
        Value::String(s) => s.trim(),
        _ => return Err(bad()),
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" | "M" => 1,
        "K" => return Ok(n.div_ceil(1024).max(1)),
        "G" => 1024,
        "T" => 1024 * 1024,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).filter(|m| *m > 0).ok_or_else(bad)
}

/// `time: 4h` (or `90m`, `30s`, `2d`, `1h30m`, Slurm's `[D-]HH:MM:SS`, a number of minutes)
/// in seconds.
pub(super) fn parse_time(v: &Value) -> Result<u64, String> {
    let bad =
        || format!("resource `time` must be a duration like 30m, 4h, 2d or 1-12:00:00, not {v}");
    let s = match v {
        Value::Number(n) => {
            return n
                .as_u64()
                .filter(|n| *n > 0)
                .map(|m| m * 60)
                .ok_or_else(bad)
        }
        Value::String(s) => s.trim().to_string(),
        _ => return Err(bad()),
    };
    let secs = if s.contains(':') {
        let (days, clock) = match s.split_once('-') {
            Some((d, c)) => (d.parse::<u64>().map_err(|_| bad())?, c.to_string()),
            None => (0, s.clone()),
        };
        let parts: Vec<u64> = clock
            .split(':')
            .map(|p| p.parse::<u64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let hms = match parts.as_slice() {
            [m, s] => m * 60 + s,
            [h, m, s] => h * 3600 + m * 60 + s,
            _ => return Err(bad()),
        };
        days * 86400 + hms
    } else if let Ok(m) = s.parse::<u64>() {
        m * 60
    } else {
        let mut total = 0u64;
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: u64 = num.parse().map_err(|_| bad())?;
            num.clear();
            total += n * match c {
                'd' => 86400,
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
        }
        if !num.is_empty() {
            return Err(bad());
        }
        total
    };
    if secs == 0 {
        return Err(bad());
    }
    Ok(secs)
}

pub(super) fn scalar_suffix(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

pub(super) fn foreach_items(f: &Value, room: usize) -> Result<Vec<Item>, String> {
    // `foreach: "{{ params.n }}"` renders to the string "3": read it as the number.
    if let Some(n) = f.as_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        return foreach_items(&Value::from(n), room);
    }
    let count = match f {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::Array(a) => a.len() as u64,
        Value::Object(m) => m.len() as u64,
        _ => 0,
    };
    if count > room as u64 {
        return Err(format!(
            "`foreach:` has {count} items and {}; split the experiment into several pipelines",
            too_many_stages()
        ));
    }
    match f {
        Value::Number(n) => {
            let n = n
                .as_u64()
                .ok_or("`foreach:` with a number needs a whole number N (items 1..N)")?;
            Ok((1..=n)
                .map(|i| Item {
                    suffix: i.to_string(),
                    value: Value::from(i),
                    key: None,
                })
                .collect())
        }
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let suffix = match v {
                    Value::Object(m) => m
                        .values()
                        .map(scalar_suffix)
                        .collect::<Option<Vec<_>>>()
                        .map(|v| v.join("-"))
                        .unwrap_or_else(|| i.to_string()),
                    other => scalar_suffix(other)
                        .ok_or("`foreach:` items must be scalars or mappings")?,
                };
                Ok(Item {
                    suffix,
                    value: v.clone(),
                    key: None,
                })
            })
            .collect(),
        Value::Object(m) => Ok(m
            .iter()
            .map(|(k, v)| Item {
                suffix: k.clone(),
                value: v.clone(),
                key: Some(k.clone()),
            })
            .collect()),
        _ => Err("`foreach:` takes a number N, a list, or a mapping".into()),
    }
}

pub(super) fn matrix_items(m: &Value, room: usize) -> Result<Vec<Item>, String> {
    let Value::Object(m) = m else {
        return Err(
            "`matrix:` maps names to lists of values, e.g. {lr: [0.1, 0.01], arch: [r18, r50]}"
                .into(),
        );
    };
    let combinations = m.values().try_fold(1u64, |acc, v| {
        acc.checked_mul(v.as_array().map_or(1, |a| a.len() as u64))
    });
    if combinations.is_none_or(|c| c > room as u64) {
        return Err(format!(
            "`matrix:` has {} combinations and {}; split the experiment into several pipelines",
            combinations.map_or("too many".to_string(), |c| c.to_string()),
            too_many_stages()
        ));
    }
    let mut combos: Vec<(Vec<String>, Map<String, Value>)> = vec![(vec![], Map::new())];
    for (k, vals) in m {
        let Value::Array(vals) = vals else {
            return Err(format!("matrix entry `{k}` must be a list"));
        };
        let mut next = Vec::new();
        for (names, map) in &combos {
            for v in vals {
                let s =
                    scalar_suffix(v).ok_or(format!("matrix values of `{k}` must be scalars"))?;
                let mut names = names.clone();
                names.push(s);
                let mut map = map.clone();
                map.insert(k.clone(), v.clone());
                next.push((names, map));
            }
        }
        combos = next;
    }
    Ok(combos
        .into_iter()
        .map(|(names, map)| Item {
            suffix: names.join("-"),
            value: Value::Object(map),
            key: None,
        })
        .collect())
}

/// Letters, digits, `_` and `-`, not starting with `-`: a name that is never a path (`.`,
/// `..`), never reads as `stage.port`, and never as a command-line flag.
pub(super) fn valid_stage_name(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        && s.chars().next().is_some_and(|c| c != '-')
}

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | '+' | '@'))
}

pub(super) struct Vars<'a> {
    item: &'a Value,
    key: Option<&'a str>,
    index: usize,
    prev: Option<&'a str>,
}

/// Replaces `${item}`, `${item.a.b}`, `${key}`, `${index}`, `${prev}` in strings. Other
/// `${...}` (shell variables) are left alone. A string that is exactly one `${item...}` takes
/// the item's value with its type.
pub(super) fn substitute(v: &Value, vars: &Vars) -> Result<Value, String> {
    match v {
        Value::String(s) => {
            let t = s.trim();
            if t.starts_with("${") && t.ends_with('}') && t.matches("${").count() == 1 {
                if let Some(val) = lookup(&t[2..t.len() - 1], vars)? {
                    return Ok(val);
                }
            }
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(i) = rest.find("${") {
                out.push_str(&rest[..i]);
                let after = &rest[i + 2..];
                let Some(j) = after.find('}') else {
                    out.push_str(&rest[i..]);
                    rest = "";
                    break;
                };
                match lookup(&after[..j], vars)? {
                    Some(val) => out.push_str(&match val {
                        Value::String(s) => s,
                        other => other.to_string(),
                    }),
                    None => out.push_str(&rest[i..i + 2 + j + 1]),
                }
                rest = &after[j + 1..];
            }
            out.push_str(rest);
            Ok(Value::String(out))
        }
        Value::Array(a) => Ok(Value::Array(
            a.iter()
                .map(|x| substitute(x, vars))
                .collect::<Result<_, _>>()?,
        )),
        Value::Object(m) => {
            let mut o = Map::new();
            for (k, x) in m {
                o.insert(k.clone(), substitute(x, vars)?);
            }
            Ok(Value::Object(o))
        }
        other => Ok(other.clone()),
    }
}

pub(super) fn lookup(expr: &str, vars: &Vars) -> Result<Option<Value>, String> {
    let mut parts = expr.trim().split('.');
    let head = parts.next().unwrap_or("");
    match head {
        "item" => {
            let mut cur = vars.item;
            for p in parts {
                cur = cur
                    .get(p)
                    .ok_or_else(|| format!("`${{{expr}}}`: the item has no field `{p}`"))?;
            }
            Ok(Some(cur.clone()))
        }
        "key" => vars
            .key
            .map(|k| Some(Value::String(k.to_string())))
            .ok_or_else(|| "`${key}` is only defined when `foreach:` is a mapping".to_string()),
        "index" => Ok(Some(Value::from(vars.index))),
        "prev" => vars
            .prev
            .map(|p| Some(Value::String(p.to_string())))
            .ok_or_else(|| {
                "`${prev}` is used outside `inputs:` for the first item, which has no previous item"
                    .to_string()
            }),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn memory_sizes_read_as_slurm_reads_them() {
        assert_eq!(parse_mem(&json!("32G")), Ok(32 * 1024));
        assert_eq!(parse_mem(&json!("500M")), Ok(500));
        assert_eq!(parse_mem(&json!("1T")), Ok(1024 * 1024));
        assert_eq!(parse_mem(&json!("16GB")), Ok(16 * 1024));
        assert_eq!(parse_mem(&json!(2048)), Ok(2048));
        for bad in [json!("lots"), json!("0G"), json!("3X"), json!(true)] {
            let e = parse_mem(&bad).unwrap_err();
            assert!(e.contains("like 512M, 32G or 1T"), "{e}");
        }
    }

    #[test]
    fn durations_read_in_both_spellings() {
        assert_eq!(parse_time(&json!("4h")), Ok(4 * 3600));
        assert_eq!(parse_time(&json!("1h30m")), Ok(5400));
        assert_eq!(parse_time(&json!("2d")), Ok(2 * 86400));
        assert_eq!(parse_time(&json!("90s")), Ok(90));
        assert_eq!(parse_time(&json!("1-12:00:00")), Ok(86400 + 12 * 3600));
        assert_eq!(parse_time(&json!("02:30:00")), Ok(9000));
        assert_eq!(parse_time(&json!(30)), Ok(1800));
        // A bare number is minutes, as Slurm reads it.
        assert_eq!(parse_time(&json!("4")), Ok(240));
        for bad in [json!("soon"), json!("0h"), json!("1:2:3:4"), json!("4x")] {
            let e = parse_time(&bad).unwrap_err();
            assert!(e.contains("like 30m, 4h"), "{e}");
        }
    }

    #[test]
    fn resources_take_mem_and_time_and_name_the_known_ones() {
        let r = parse_resources(Some(
            &json!({"cpu": 2, "gpu": 1, "mem": "8G", "time": "1h"}),
        ))
        .unwrap();
        assert_eq!((r.cpu, r.gpu, r.mem_mb, r.time_s), (2, 1, 8192, 3600));
        let e = parse_resources(Some(&json!({"disk": 3}))).unwrap_err();
        assert!(e.contains("known: cpu, gpu, mem, time"), "{e}");
        assert_eq!(parse_retries(Some(&json!(3))), Ok(Some(3)));
        assert!(parse_retries(Some(&json!(-1))).is_err());
        assert!(parse_retries(Some(&json!("x"))).is_err());
    }
}
