//! A pickle reader that executes nothing: it builds a tree of values from the opcodes
//! (protocols 0-5), representing `GLOBAL`/`REDUCE`/`BUILD`/`NEWOBJ` as inert nodes that the
//! caller interprets (numpy arrays and scalars are recognised by [`ndarray`]). Byte strings are
//! ranges into the input buffer, so a 100 MB `.bin` is parsed without copying images.

use std::ops::Range;
use std::rc::Rc;

/// A value of the pickle's object tree.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Bytes (py3 `bytes`, py2 `str`, `bytearray`): a range of the input.
    Bytes(Range<usize>),
    Str(String),
    List(Rc<Vec<Val>>),
    Tuple(Rc<Vec<Val>>),
    Dict(Rc<Vec<(Val, Val)>>),
    /// `module.name`, never imported.
    Global(String, String),
    /// `callable(*args)`, never called.
    Reduce(Rc<Val>, Rc<Val>),
    /// `obj.__setstate__(state)`, never called.
    Build(Rc<Val>, Rc<Val>),
}

/// Why a pickle could not be read, with the byte offset of the opcode.
#[derive(Debug, PartialEq)]
pub struct PickleError {
    pub offset: usize,
    pub message: String,
}

fn err<T>(offset: usize, message: impl Into<String>) -> Result<T, PickleError> {
    Err(PickleError {
        offset,
        message: message.into(),
    })
}

/// Parses the pickle in `data` and returns its top-level value.
pub fn parse(data: &[u8]) -> Result<Val, PickleError> {
    let mut stack: Vec<Val> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Val> = Default::default();
    let mut pos = 0usize;
    macro_rules! take {
        ($n:expr, $at:expr) => {{
            let n: usize = $n;
            match data.get(pos..pos.checked_add(n).unwrap_or(usize::MAX)) {
                Some(s) => {
                    pos += n;
                    s
                }
                None => return err($at, format!("truncated: needs {n} more bytes")),
            }
        }};
    }
    macro_rules! pop {
        ($at:expr) => {
            match stack.pop() {
                Some(v) => v,
                None => return err($at, "stack underflow"),
            }
        };
    }
    fn uint(b: &[u8]) -> u64 {
        let mut v = 0u64;
        for (i, &x) in b.iter().enumerate() {
            v |= (x as u64) << (8 * i);
        }
        v
    }
    loop {
        let at = pos;
        let op = *take!(1, at).first().unwrap_or(&0);
        match op {
            0x80 => {
                take!(1, at); // PROTO
            }
            0x95 => {
                take!(8, at); // FRAME
            }
            b'.' => {
                return match stack.pop() {
                    Some(v) => Ok(v),
                    None => err(at, "STOP with an empty stack"),
                }
            }
            b'(' => marks.push(stack.len()),
            b']' => stack.push(Val::List(Rc::new(vec![]))),
            b')' => stack.push(Val::Tuple(Rc::new(vec![]))),
            b'}' => stack.push(Val::Dict(Rc::new(vec![]))),
            b'N' => stack.push(Val::None),
            0x88 => stack.push(Val::Bool(true)),
            0x89 => stack.push(Val::Bool(false)),
            b'J' => {
                let b = take!(4, at);
                stack.push(Val::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64))
            }
            b'K' => {
                let b = take!(1, at);
                stack.push(Val::Int(b[0] as i64))
            }
            b'M' => {
                let b = take!(2, at);
                stack.push(Val::Int(u16::from_le_bytes([b[0], b[1]]) as i64))
            }
            0x8a => {
                // LONG1
                let n = take!(1, at)[0] as usize;
                let b = take!(n, at);
                if n > 8 {
                    return err(at, "integer longer than 8 bytes");
                }
                let mut v = uint(b) as i64;
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Val::Int(v))
            }
            b'G' => {
                let b = take!(8, at);
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                stack.push(Val::Float(f64::from_be_bytes(a)))
            }
            b'I' | b'L' => {
                // INT / LONG (text): up to newline.
                let end = match data[pos..].iter().position(|&c| c == b'\n') {
                    Some(e) => pos + e,
                    None => return err(at, "unterminated text integer"),
                };
                let s = String::from_utf8_lossy(&data[pos..end])
                    .trim_end_matches('L')
                    .to_string();
                pos = end + 1;
                let v = match s.as_str() {
                    "00" => Val::Bool(false),
                    "01" => Val::Bool(true),
                    _ => match s.parse::<i64>() {
                        Ok(v) => Val::Int(v),
                        Err(_) => return err(at, format!("bad integer `{s}`")),
                    },
                };
                stack.push(v)
            }
            b'U' | b'C' => {
                let n = take!(1, at)[0] as usize;
                let s = pos;
                take!(n, at);
                stack.push(Val::Bytes(s..s + n))
            }
            b'T' | b'B' => {
                let b = take!(4, at);
                let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let s = pos;
                take!(n, at);
                stack.push(Val::Bytes(s..s + n))
            }
            0x8e | 0x96 => {
                // BINBYTES8 / BYTEARRAY8
                let n = uint(take!(8, at)) as usize;
                let s = pos;
                take!(n, at);
                stack.push(Val::Bytes(s..s + n))
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => uint(take!(4, at)) as usize,
                    0x8c => take!(1, at)[0] as usize,
                    _ => uint(take!(8, at)) as usize,
                };
                let b = take!(n, at);
                stack.push(Val::Str(String::from_utf8_lossy(b).into_owned()))
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let mut parts = Vec::new();
                for _ in 0..2 {
                    let end = match data[pos..].iter().position(|&c| c == b'\n') {
                        Some(e) => pos + e,
                        None => return err(at, "unterminated GLOBAL"),
                    };
                    parts.push(String::from_utf8_lossy(&data[pos..end]).into_owned());
                    pos = end + 1;
                }
                stack.push(Val::Global(parts[0].clone(), parts[1].clone()))
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop!(at);
                let module = pop!(at);
                match (module, name) {
                    (Val::Str(m), Val::Str(n)) => stack.push(Val::Global(m, n)),
                    _ => return err(at, "STACK_GLOBAL needs two strings"),
                }
            }
            b'R' | 0x81 => {
                // REDUCE / NEWOBJ
                let args = pop!(at);
                let f = pop!(at);
                stack.push(Val::Reduce(Rc::new(f), Rc::new(args)))
            }
            b'b' => {
                let state = pop!(at);
                let obj = pop!(at);
                stack.push(Val::Build(Rc::new(obj), Rc::new(state)))
            }
            b't' | b'l' | b'd' => {
                let m = match marks.pop() {
                    Some(m) if m <= stack.len() => m,
                    _ => return err(at, "no MARK"),
                };
                let items: Vec<Val> = stack.drain(m..).collect();
                stack.push(match op {
                    b't' => Val::Tuple(Rc::new(items)),
                    b'l' => Val::List(Rc::new(items)),
                    _ => {
                        if !items.len().is_multiple_of(2) {
                            return err(at, "DICT with an odd number of items");
                        }
                        let mut it = items.into_iter();
                        let mut kv = Vec::new();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            kv.push((k, v));
                        }
                        Val::Dict(Rc::new(kv))
                    }
                })
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return err(at, "stack underflow");
                }
                let items: Vec<Val> = stack.split_off(stack.len() - n);
                stack.push(Val::Tuple(Rc::new(items)))
            }
            b'a' | b'e' => {
                let items: Vec<Val> = if op == b'a' {
                    vec![pop!(at)]
                } else {
                    let m = match marks.pop() {
                        Some(m) if m <= stack.len() => m,
                        _ => return err(at, "no MARK"),
                    };
                    stack.drain(m..).collect()
                };
                match stack.last_mut() {
                    Some(Val::List(l)) => Rc::make_mut(l).extend(items),
                    _ => return err(at, "APPEND to something that is not a list"),
                }
            }
            b's' | b'u' => {
                let items: Vec<Val> = if op == b's' {
                    let v = pop!(at);
                    let k = pop!(at);
                    vec![k, v]
                } else {
                    let m = match marks.pop() {
                        Some(m) if m <= stack.len() => m,
                        _ => return err(at, "no MARK"),
                    };
                    stack.drain(m..).collect()
                };
                match stack.last_mut() {
                    Some(Val::Dict(d)) => {
                        let d = Rc::make_mut(d);
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    _ => return err(at, "SETITEM on something that is not a dict"),
                }
            }
            b'q' | b'r' | b'p' | 0x94 => {
                let key = match op {
                    b'q' => take!(1, at)[0] as u64,
                    b'r' => uint(take!(4, at)),
                    b'p' => {
                        let end = match data[pos..].iter().position(|&c| c == b'\n') {
                            Some(e) => pos + e,
                            None => return err(at, "unterminated PUT"),
                        };
                        let s = String::from_utf8_lossy(&data[pos..end]).into_owned();
                        pos = end + 1;
                        match s.parse() {
                            Ok(v) => v,
                            Err(_) => return err(at, "bad PUT index"),
                        }
                    }
                    _ => memo.len() as u64,
                };
                match stack.last() {
                    Some(v) => {
                        memo.insert(key, v.clone());
                    }
                    None => return err(at, "PUT with an empty stack"),
                }
            }
            b'h' | b'j' | b'g' => {
                let key = match op {
                    b'h' => take!(1, at)[0] as u64,
                    b'j' => uint(take!(4, at)),
                    _ => {
                        let end = match data[pos..].iter().position(|&c| c == b'\n') {
                            Some(e) => pos + e,
                            None => return err(at, "unterminated GET"),
                        };
                        let s = String::from_utf8_lossy(&data[pos..end]).into_owned();
                        pos = end + 1;
                        match s.parse() {
                            Ok(v) => v,
                            Err(_) => return err(at, "bad GET index"),
                        }
                    }
                };
                match memo.get(&key) {
                    Some(v) => stack.push(v.clone()),
                    None => return err(at, format!("memo key {key} not defined")),
                }
            }
            b'0' => {
                pop!(at);
            }
            b'2' => {
                let v = match stack.last() {
                    Some(v) => v.clone(),
                    None => return err(at, "DUP with an empty stack"),
                };
                stack.push(v)
            }
            b'1' => {
                let m = match marks.pop() {
                    Some(m) if m <= stack.len() => m,
                    _ => return err(at, "no MARK"),
                };
                stack.truncate(m);
            }
            other => {
                return err(
                    at,
                    format!(
                        "unsupported pickle opcode {other:#04x} (this reader executes nothing)"
                    ),
                )
            }
        }
    }
}

/// A numpy array found in the tree: dtype string (`u1`, `b1`, `<f4`, ...), shape, and the
/// value holding its raw bytes (resolve with [`bytes`]).
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Val,
}

/// The bytes a value stands for: `bytes`/py2 `str` (borrowed from `input`), Python 3's
/// protocol-2 spelling `_codecs.encode(str, 'latin1')`, or `bytes()` (empty).
pub fn bytes<'a>(v: &Val, input: &'a [u8]) -> Option<std::borrow::Cow<'a, [u8]>> {
    use std::borrow::Cow;
    match v {
        Val::Bytes(r) => input.get(r.clone()).map(Cow::Borrowed),
        Val::Reduce(f, args) => {
            let Val::Tuple(a) = args.as_ref() else {
                return None;
            };
            match f.as_ref() {
                Val::Global(m, n) if m == "_codecs" && n == "encode" => {
                    let Val::Str(s) = a.first()? else { return None };
                    match a.get(1) {
                        Some(Val::Str(e)) if e == "latin1" || e == "latin-1" => {}
                        _ => return None,
                    }
                    s.chars()
                        .map(|c| u8::try_from(c as u32).ok())
                        .collect::<Option<Vec<u8>>>()
                        .map(Cow::Owned)
                }
                Val::Global(m, n)
                    if (m == "__builtin__" || m == "builtins") && n == "bytes" && a.is_empty() =>
                {
                    Some(Cow::Owned(vec![]))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn is_numpy(v: &Val, names: &[&str]) -> bool {
    matches!(v, Val::Global(m, n) if m.starts_with("numpy") && names.contains(&n.as_str()))
}

fn dtype_of(v: &Val) -> Option<String> {
    // numpy.dtype('u1', False, True) [+ BUILD state]: take the type string.
    let v = match v {
        Val::Build(o, _) => o.as_ref(),
        other => other,
    };
    if let Val::Reduce(f, args) = v {
        if is_numpy(f, &["dtype"]) {
            if let Val::Tuple(a) = args.as_ref() {
                if let Some(Val::Str(s)) = a.first() {
                    return Some(s.clone());
                }
            }
        }
    }
    None
}

fn shape_of(v: &Val) -> Option<Vec<usize>> {
    match v {
        Val::Tuple(t) => t
            .iter()
            .map(|x| match x {
                Val::Int(i) if *i >= 0 => Some(*i as usize),
                _ => None,
            })
            .collect(),
        Val::Int(i) if *i >= 0 => Some(vec![*i as usize]),
        _ => None,
    }
}

/// Recognises a numpy array pickled by `ndarray.__reduce__` (`_reconstruct` + `BUILD`
/// state `(version, shape, dtype, fortran, data)`) or by protocol 5's `_frombuffer`.
pub fn ndarray(v: &Val) -> Option<NdArray> {
    match v {
        Val::Build(obj, state) => {
            if let Val::Reduce(f, _) = obj.as_ref() {
                if !is_numpy(f, &["_reconstruct"]) {
                    return None;
                }
            }
            let Val::Tuple(s) = state.as_ref() else {
                return None;
            };
            let (shape, dtype, data) = match s.len() {
                5 => (&s[1], &s[2], &s[4]),
                4 => (&s[0], &s[1], &s[3]),
                _ => return None,
            };
            Some(NdArray {
                dtype: dtype_of(dtype)?,
                shape: shape_of(shape)?,
                data: data.clone(),
            })
        }
        Val::Reduce(f, args) if is_numpy(f, &["_frombuffer"]) => {
            let Val::Tuple(a) = args.as_ref() else {
                return None;
            };
            Some(NdArray {
                dtype: dtype_of(a.get(1)?)?,
                shape: shape_of(a.get(2)?)?,
                data: a.first()?.clone(),
            })
        }
        _ => None,
    }
}

/// A numpy scalar (`numpy.core.multiarray.scalar(dtype, bytes)`): dtype and the value
/// holding its raw bytes.
pub fn np_scalar(v: &Val) -> Option<(String, Val)> {
    if let Val::Reduce(f, args) = v {
        if is_numpy(f, &["scalar"]) {
            if let Val::Tuple(a) = args.as_ref() {
                if let (Some(d), Some(b)) = (a.first().and_then(dtype_of), a.get(1)) {
                    return Some((d, b.clone()));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol2_py2_strings_and_bools() {
        // Python 2: pickle.dumps((['ab', 'c'], [True, False]), 2)
        let p = b"\x80\x02]q\x00(U\x02abq\x01U\x01cq\x02e]q\x03(\x88\x89e\x86q\x04.";
        let v = parse(p).unwrap();
        let Val::Tuple(t) = v else { panic!() };
        assert_eq!(
            t[0],
            Val::List(Rc::new(vec![Val::Bytes(8..10), Val::Bytes(14..15)]))
        );
        assert_eq!(
            t[1],
            Val::List(Rc::new(vec![Val::Bool(true), Val::Bool(false)]))
        );
    }

    #[test]
    fn garbage_is_an_error_with_offset() {
        let e = parse(b"\x80\x02]q\x00(U\x09ab").unwrap_err();
        assert_eq!(e.offset, 6);
        let e = parse(b"\x80\x02Z").unwrap_err();
        assert!(e.message.contains("unsupported"));
        assert!(parse(b"").is_err());
        assert!(parse(b"e.").is_err());
    }
}
