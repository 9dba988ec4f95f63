//! A pickle reader that executes nothing: it builds a tree of values from the opcodes
//! (protocols 0-5), representing `GLOBAL`/`REDUCE`/`BUILD`/`NEWOBJ` as inert nodes that the
//! caller interprets (numpy arrays and scalars are recognised by [`ndarray`]). Byte strings are
//! ranges into the input buffer, so a 100 MB `.bin` is parsed without copying images.
//!
//! A hostile file cannot make the reader exhaust the stack or memory: parsing is a loop over
//! the opcodes, values nest at most [`MAX_DEPTH`] levels, strings are shared (never copied) by
//! memo references, and copies of memoized lists and dicts are bounded by the input's size.
//! Dropping, comparing and printing values use no recursion that the input can deepen.

use std::ops::Range;
use std::rc::Rc;

/// The deepest nesting of lists, tuples, dicts and objects a pickle may have. Verification
/// `.bin` files nest under 10 levels; deeper values are refused so that code walking the
/// tree cannot exhaust the stack.
pub const MAX_DEPTH: u32 = 128;

/// A value of the pickle's object tree.
#[derive(Clone)]
pub enum Val {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Bytes (py3 `bytes`, py2 `str`, `bytearray`): a range of the input.
    Bytes(Range<usize>),
    Str(Rc<str>),
    List(Rc<Vec<Val>>),
    Tuple(Rc<Vec<Val>>),
    Dict(Rc<Vec<(Val, Val)>>),
    /// `module.name`, never imported.
    Global(Rc<str>, Rc<str>),
    /// `callable(*args)`, never called.
    Reduce(Rc<Val>, Rc<Val>),
    /// `obj.__setstate__(state)`, never called.
    Build(Rc<Val>, Rc<Val>),
}

impl Val {
    /// Moves the children this value owns alone (not shared through the memo) into `out`,
    /// leaving empty containers behind: the step of the iterative [`Drop`].
    fn take_children(&mut self, out: &mut Vec<Val>) {
        match self {
            Val::List(l) | Val::Tuple(l) => {
                if let Some(items) = Rc::get_mut(l) {
                    out.append(items);
                }
            }
            Val::Dict(d) => {
                if let Some(items) = Rc::get_mut(d) {
                    for (k, v) in items.drain(..) {
                        out.push(k);
                        out.push(v);
                    }
                }
            }
            Val::Reduce(a, b) | Val::Build(a, b) => {
                for r in [a, b] {
                    if let Some(v) = Rc::get_mut(r) {
                        if v.has_children() {
                            out.push(std::mem::replace(v, Val::None));
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn has_children(&self) -> bool {
        matches!(
            self,
            Val::List(_) | Val::Tuple(_) | Val::Dict(_) | Val::Reduce(..) | Val::Build(..)
        )
    }
}

/// Drops a tree of any depth without recursion: children are moved to a work list before
/// their parent goes, so each drop only ever sees childless values.
impl Drop for Val {
    fn drop(&mut self) {
        if !self.has_children() {
            return;
        }
        let mut work = Vec::new();
        self.take_children(&mut work);
        while let Some(mut v) = work.pop() {
            v.take_children(&mut work);
        }
    }
}

/// Structural equality, compared with a work list instead of recursion.
impl PartialEq for Val {
    fn eq(&self, other: &Val) -> bool {
        let mut work: Vec<(&Val, &Val)> = vec![(self, other)];
        while let Some((a, b)) = work.pop() {
            match (a, b) {
                (Val::None, Val::None) => {}
                (Val::Bool(x), Val::Bool(y)) if x == y => {}
                (Val::Int(x), Val::Int(y)) if x == y => {}
                (Val::Float(x), Val::Float(y)) if x == y => {}
                (Val::Bytes(x), Val::Bytes(y)) if x == y => {}
                (Val::Str(x), Val::Str(y)) if x == y => {}
                (Val::Global(m, n), Val::Global(p, q)) if m == p && n == q => {}
                (Val::List(x), Val::List(y)) | (Val::Tuple(x), Val::Tuple(y)) => {
                    if Rc::ptr_eq(x, y) {
                        continue;
                    }
                    if x.len() != y.len() {
                        return false;
                    }
                    work.extend(x.iter().zip(y.iter()));
                }
                (Val::Dict(x), Val::Dict(y)) => {
                    if Rc::ptr_eq(x, y) {
                        continue;
                    }
                    if x.len() != y.len() {
                        return false;
                    }
                    for ((k1, v1), (k2, v2)) in x.iter().zip(y.iter()) {
                        work.push((k1, k2));
                        work.push((v1, v2));
                    }
                }
                (Val::Reduce(f, x), Val::Reduce(g, y)) | (Val::Build(f, x), Val::Build(g, y)) => {
                    work.push((f.as_ref(), g.as_ref()));
                    work.push((x.as_ref(), y.as_ref()));
                }
                _ => return false,
            }
        }
        true
    }
}

/// Debug output limited in depth and length (a shared subtree is printed each time it
/// appears, so an unlimited printer could run for ever on a small file).
impl std::fmt::Debug for Val {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let budget = std::cell::Cell::new(DEBUG_NODES);
        fmt_val(self, f, 0, &budget)
    }
}

/// Most nodes one `{:?}` of a [`Val`] prints; the rest is written `…`.
const DEBUG_NODES: usize = 10_000;
/// Deepest level one `{:?}` of a [`Val`] prints.
const DEBUG_DEPTH: usize = 32;

fn fmt_val(
    v: &Val,
    f: &mut std::fmt::Formatter<'_>,
    depth: usize,
    budget: &std::cell::Cell<usize>,
) -> std::fmt::Result {
    if budget.get() == 0 || depth > DEBUG_DEPTH {
        return f.write_str("…");
    }
    budget.set(budget.get() - 1);
    let seq = |f: &mut std::fmt::Formatter<'_>,
               open: &str,
               close: &str,
               items: &mut dyn Iterator<Item = &Val>|
     -> std::fmt::Result {
        f.write_str(open)?;
        for (i, x) in items.enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            fmt_val(x, f, depth + 1, budget)?;
        }
        f.write_str(close)
    };
    match v {
        Val::None => f.write_str("None"),
        Val::Bool(b) => write!(f, "Bool({b})"),
        Val::Int(i) => write!(f, "Int({i})"),
        Val::Float(x) => write!(f, "Float({x:?})"),
        Val::Bytes(r) => write!(f, "Bytes({r:?})"),
        Val::Str(s) => write!(f, "Str({s:?})"),
        Val::Global(m, n) => write!(f, "Global({m:?}, {n:?})"),
        Val::List(l) => seq(f, "List([", "])", &mut l.iter()),
        Val::Tuple(t) => seq(f, "Tuple((", "))", &mut t.iter()),
        Val::Dict(d) => seq(f, "Dict({", "})", &mut d.iter().flat_map(|(k, v)| [k, v])),
        Val::Reduce(a, b) => seq(f, "Reduce(", ")", &mut [&**a, &**b].into_iter()),
        Val::Build(a, b) => seq(f, "Build(", ")", &mut [&**a, &**b].into_iter()),
    }
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

/// A value on the parser's stack or in its memo, with how deep it nests (0 for scalars).
#[derive(Clone)]
struct Node {
    v: Val,
    depth: u32,
}

fn leaf(v: Val) -> Node {
    Node { v, depth: 0 }
}

/// Nesting depth of a container holding `items`, or an error past [`MAX_DEPTH`].
fn depth_over<'a>(
    items: impl IntoIterator<Item = &'a Node>,
    at: usize,
) -> Result<u32, PickleError> {
    let d = 1 + items.into_iter().map(|n| n.depth).max().unwrap_or(0);
    if d > MAX_DEPTH {
        return err(
            at,
            format!("values nested deeper than {MAX_DEPTH} levels; a data file never is"),
        );
    }
    Ok(d)
}

/// Parses the pickle in `data` and returns its top-level value.
///
/// Errors (with the opcode's byte offset) for malformed input, unsupported opcodes, nesting
/// deeper than [`MAX_DEPTH`], and memo tricks that would copy more list/dict elements than
/// a few times the input's size.
pub fn parse(data: &[u8]) -> Result<Val, PickleError> {
    let mut stack: Vec<Node> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Node> = Default::default();
    let mut pos = 0usize;
    // Elements the parser may still copy when it appends to a list or dict that the memo
    // shares (copy on write); a pickle that appends to memoized containers over and over
    // would otherwise need time and memory quadratic in its size.
    let mut copy_budget = data.len().saturating_mul(4).saturating_add(1 << 16);
    macro_rules! take {
        ($n:expr, $at:expr) => {{
            let n: usize = $n;
            match pos.checked_add(n).and_then(|end| data.get(pos..end)) {
                Some(s) => {
                    pos += n;
                    s
                }
                None => {
                    return err(
                        $at,
                        format!(
                            "truncated: needs {n} more bytes, {} left",
                            data.len().saturating_sub(pos)
                        ),
                    )
                }
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
    macro_rules! text_line {
        ($at:expr, $what:expr) => {{
            let end = match data[pos..].iter().position(|&c| c == b'\n') {
                Some(e) => pos + e,
                None => return err($at, format!("unterminated {}", $what)),
            };
            let s = &data[pos..end];
            pos = end + 1;
            s
        }};
    }
    macro_rules! pop_mark {
        ($at:expr) => {
            match marks.pop() {
                Some(m) if m <= stack.len() => m,
                _ => return err($at, "no MARK"),
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
    // Makes the vector behind `rc` unique before a change, charging a copy to the budget.
    fn unique<'a, T: Clone>(
        rc: &'a mut Rc<Vec<T>>,
        budget: &mut usize,
        at: usize,
    ) -> Result<&'a mut Vec<T>, PickleError> {
        if Rc::get_mut(rc).is_none() {
            let n = rc.len().max(1);
            if n > *budget {
                return err(
                    at,
                    "the pickle keeps appending to memoized lists or dicts, which would copy them \
                     far more often than its size allows; the file is corrupt or hostile",
                );
            }
            *budget -= n;
        }
        Ok(Rc::make_mut(rc))
    }
    loop {
        let at = pos;
        let op = take!(1, at)[0];
        match op {
            0x80 => {
                take!(1, at); // PROTO
            }
            0x95 => {
                take!(8, at); // FRAME
            }
            b'.' => {
                return match stack.pop() {
                    Some(n) => Ok(n.v),
                    None => err(at, "STOP with an empty stack"),
                }
            }
            b'(' => marks.push(stack.len()),
            b']' => stack.push(Node {
                v: Val::List(Rc::new(vec![])),
                depth: 1,
            }),
            b')' => stack.push(Node {
                v: Val::Tuple(Rc::new(vec![])),
                depth: 1,
            }),
            b'}' => stack.push(Node {
                v: Val::Dict(Rc::new(vec![])),
                depth: 1,
            }),
            b'N' => stack.push(leaf(Val::None)),
            0x88 => stack.push(leaf(Val::Bool(true))),
            0x89 => stack.push(leaf(Val::Bool(false))),
            b'J' => {
                let b = take!(4, at);
                stack.push(leaf(Val::Int(
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64
                )))
            }
            b'K' => {
                let b = take!(1, at);
                stack.push(leaf(Val::Int(b[0] as i64)))
            }
            b'M' => {
                let b = take!(2, at);
                stack.push(leaf(Val::Int(u16::from_le_bytes([b[0], b[1]]) as i64)))
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
                stack.push(leaf(Val::Int(v)))
            }
            b'G' => {
                let b = take!(8, at);
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                stack.push(leaf(Val::Float(f64::from_be_bytes(a))))
            }
            b'I' | b'L' => {
                // INT / LONG (text): up to newline.
                let s = String::from_utf8_lossy(text_line!(at, "text integer"))
                    .trim_end_matches('L')
                    .to_string();
                let v = match s.as_str() {
                    "00" => Val::Bool(false),
                    "01" => Val::Bool(true),
                    _ => match s.parse::<i64>() {
                        Ok(v) => Val::Int(v),
                        Err(_) => return err(at, format!("bad integer `{s}`")),
                    },
                };
                stack.push(leaf(v))
            }
            b'U' | b'C' => {
                let n = take!(1, at)[0] as usize;
                let s = pos;
                take!(n, at);
                stack.push(leaf(Val::Bytes(s..s + n)))
            }
            b'T' | b'B' => {
                let b = take!(4, at);
                let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let s = pos;
                take!(n, at);
                stack.push(leaf(Val::Bytes(s..s + n)))
            }
            0x8e | 0x96 => {
                // BINBYTES8 / BYTEARRAY8
                let n = uint(take!(8, at)) as usize;
                let s = pos;
                take!(n, at);
                stack.push(leaf(Val::Bytes(s..s + n)))
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => uint(take!(4, at)) as usize,
                    0x8c => take!(1, at)[0] as usize,
                    _ => uint(take!(8, at)) as usize,
                };
                let b = take!(n, at);
                stack.push(leaf(Val::Str(String::from_utf8_lossy(b).into())))
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let module: Rc<str> = String::from_utf8_lossy(text_line!(at, "GLOBAL")).into();
                let name: Rc<str> = String::from_utf8_lossy(text_line!(at, "GLOBAL")).into();
                stack.push(leaf(Val::Global(module, name)))
            }
            0x93 => {
                // STACK_GLOBAL
                let name = pop!(at);
                let module = pop!(at);
                match (&module.v, &name.v) {
                    (Val::Str(m), Val::Str(n)) => {
                        stack.push(leaf(Val::Global(m.clone(), n.clone())))
                    }
                    _ => return err(at, "STACK_GLOBAL needs two strings"),
                }
            }
            b'R' | 0x81 | b'b' => {
                // REDUCE / NEWOBJ: callable, args; BUILD: object, state.
                let second = pop!(at);
                let first = pop!(at);
                let depth = depth_over([&first, &second], at)?;
                let (a, b) = (Rc::new(first.v), Rc::new(second.v));
                let v = if op == b'b' {
                    Val::Build(a, b)
                } else {
                    Val::Reduce(a, b)
                };
                stack.push(Node { v, depth })
            }
            b't' | b'l' | b'd' => {
                let m = pop_mark!(at);
                let depth = depth_over(&stack[m..], at)?;
                let items: Vec<Val> = stack.drain(m..).map(|n| n.v).collect();
                let v = match op {
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
                };
                stack.push(Node { v, depth })
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return err(at, "stack underflow");
                }
                let m = stack.len() - n;
                let depth = depth_over(&stack[m..], at)?;
                let items: Vec<Val> = stack.drain(m..).map(|n| n.v).collect();
                stack.push(Node {
                    v: Val::Tuple(Rc::new(items)),
                    depth,
                })
            }
            b'a' | b'e' | b's' | b'u' => {
                // APPEND / APPENDS / SETITEM / SETITEMS into the value below the items.
                let m = match op {
                    b'a' => stack.len().checked_sub(1),
                    b's' => stack.len().checked_sub(2),
                    _ => marks.pop().filter(|&m| m <= stack.len()),
                };
                let Some(m) = m else {
                    return err(at, "stack underflow or no MARK");
                };
                let depth = depth_over(&stack[m..], at)?;
                let items: Vec<Val> = stack.drain(m..).map(|n| n.v).collect();
                let Some(target) = stack.last_mut() else {
                    return err(at, "stack underflow");
                };
                match (&mut target.v, op) {
                    (Val::List(l), b'a' | b'e') => unique(l, &mut copy_budget, at)?.extend(items),
                    (Val::Dict(d), b's' | b'u') => {
                        if !items.len().is_multiple_of(2) {
                            return err(at, "SETITEMS with an odd number of items");
                        }
                        let d = unique(d, &mut copy_budget, at)?;
                        let mut it = items.into_iter();
                        while let (Some(k), Some(v)) = (it.next(), it.next()) {
                            d.push((k, v));
                        }
                    }
                    (_, b'a' | b'e') => return err(at, "APPEND to something that is not a list"),
                    _ => return err(at, "SETITEM on something that is not a dict"),
                }
                target.depth = target.depth.max(depth);
            }
            b'q' | b'r' | b'p' | 0x94 => {
                let key = match op {
                    b'q' => take!(1, at)[0] as u64,
                    b'r' => uint(take!(4, at)),
                    b'p' => match String::from_utf8_lossy(text_line!(at, "PUT")).parse() {
                        Ok(v) => v,
                        Err(_) => return err(at, "bad PUT index"),
                    },
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
                    _ => match String::from_utf8_lossy(text_line!(at, "GET")).parse() {
                        Ok(v) => v,
                        Err(_) => return err(at, "bad GET index"),
                    },
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
                let m = pop_mark!(at);
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
                Val::Global(m, n) if &**m == "_codecs" && &**n == "encode" => {
                    let Val::Str(s) = a.first()? else { return None };
                    match a.get(1) {
                        Some(Val::Str(e)) if matches!(&**e, "latin1" | "latin-1") => {}
                        _ => return None,
                    }
                    s.chars()
                        .map(|c| u8::try_from(c as u32).ok())
                        .collect::<Option<Vec<u8>>>()
                        .map(Cow::Owned)
                }
                Val::Global(m, n)
                    if matches!(&**m, "__builtin__" | "builtins")
                        && &**n == "bytes"
                        && a.is_empty() =>
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
    matches!(v, Val::Global(m, n) if m.starts_with("numpy") && names.contains(&&**n))
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
                    return Some(s.to_string());
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
        let Val::Tuple(t) = &v else { panic!() };
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
