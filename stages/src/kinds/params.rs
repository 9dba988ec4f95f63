//! Typed stage parameters. [`kind_params!`] declares a kind's parameters once: the struct its
//! `check_params` and `run` parse them into (`serde::Deserialize`, unknown names rejected) and
//! the [`ParamSpec`]s its signature declares (name, type, default, documentation, volatility,
//! in declaration order) come from the same lines, so a default is written in one place.
//!
//! ```ignore
//! kind_params! {
//!     /// Parameters of `align`.
//!     pub struct AlignParams {
//!         image_size: usize = Int, default 112, "output side in pixels";
//!         path: String = Path { companions: &[] }, required, "the input";
//!         batch_size: i64 = Int, default 64, volatile, "images per forward pass";
//!         ..read: OnErrorParams;
//!     }
//! }
//! ```
//!
//! The parameter type after `=` is a [`fpipe_engine::ParamType`] variant (written without the
//! `ParamType::` prefix). A default is one token tree given to `serde_json::json!` (wrap an
//! expression in parentheses). `..name: Group;` splices the parameters of another
//! `kind_params!` struct in at that position; they are parsed into the field `name` of that
//! type from the same flat parameter map, so unknown names are still rejected.

use fpipe_engine::ParamSpec;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// What [`kind_params!`] implements for every struct it declares.
pub trait KindParams: Sized + serde::de::DeserializeOwned {
    /// The declared parameters, in order (those of spliced groups included).
    fn specs() -> Vec<ParamSpec>;
    /// Moves the parameters of each spliced group into an object under the group's field name.
    #[doc(hidden)]
    fn nest(map: &mut Map<String, Value>);
    /// The first parameter (of a nested map) that does not parse as its field's type.
    #[doc(hidden)]
    fn explain(map: &Map<String, Value>) -> Option<String>;

    /// Parses a kind's resolved parameters (the engine has filled every default).
    fn from_params(params: &BTreeMap<String, Value>) -> Result<Self, String> {
        let mut map: Map<String, Value> =
            params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Self::nest(&mut map);
        serde_json::from_value(Value::Object(map.clone()))
            .map_err(|e| Self::explain(&map).unwrap_or_else(|| format!("parameters: {e}")))
    }
}

/// Moves the entries of `names` from `map` into a new map.
#[doc(hidden)]
pub fn take(map: &mut Map<String, Value>, names: &[ParamSpec]) -> Map<String, Value> {
    let mut sub = Map::new();
    for spec in names {
        if let Some(v) = map.remove(spec.name) {
            sub.insert(spec.name.to_string(), v);
        }
    }
    sub
}

/// The message for a parameter `name` whose value does not parse as `T`.
#[doc(hidden)]
pub fn explain_field<T: serde::de::DeserializeOwned>(
    map: &Map<String, Value>,
    name: &str,
) -> Option<String> {
    let v = map.get(name)?;
    serde_json::from_value::<T>(v.clone())
        .err()
        .map(|e| format!("parameter `{name}`: {e}"))
}

/// Declares a kind's parameter struct; see the [module documentation](self).
macro_rules! kind_params {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($body:tt)* }) => {
        $crate::kinds::params::kind_params!(@munch [$(#[$m])* $vis struct $name] [] $($body)*);
    };
    // A parameter with a default.
    (@munch $head:tt [$($acc:tt)*]
        $(#[$fm:meta])* $f:ident : $t:ty = $pty:expr, default $d:tt, $($vol:ident,)? $doc:literal;
        $($rest:tt)*) => {
        $crate::kinds::params::kind_params!(@munch $head [$($acc)* (field [$(#[$fm])*] $f: $t => {
            ::fpipe_engine::ParamSpec::with_default(
                stringify!($f),
                {
                    #[allow(unused_imports)]
                    use ::fpipe_engine::ParamType::*;
                    $pty
                },
                ::serde_json::json!($d),
                $doc,
            )$(.$vol())?
        }, $doc)] $($rest)*);
    };
    // A required parameter.
    (@munch $head:tt [$($acc:tt)*]
        $(#[$fm:meta])* $f:ident : $t:ty = $pty:expr, required, $($vol:ident,)? $doc:literal;
        $($rest:tt)*) => {
        $crate::kinds::params::kind_params!(@munch $head [$($acc)* (field [$(#[$fm])*] $f: $t => {
            ::fpipe_engine::ParamSpec::required(
                stringify!($f),
                {
                    #[allow(unused_imports)]
                    use ::fpipe_engine::ParamType::*;
                    $pty
                },
                $doc,
            )$(.$vol())?
        }, $doc)] $($rest)*);
    };
    // The parameters of another `kind_params!` struct, parsed into field `$g`.
    (@munch $head:tt [$($acc:tt)*]
        $(#[$fm:meta])* ..$g:ident : $gt:ty;
        $($rest:tt)*) => {
        $crate::kinds::params::kind_params!(@munch $head [$($acc)* (group [$(#[$fm])*] $g: $gt => {
            <$gt as $crate::kinds::params::KindParams>::specs()
        }, "A group of parameters, given flat beside the others.")] $($rest)*);
    };
    (@munch [$(#[$m:meta])* $vis:vis struct $name:ident]
        [$(($what:ident [$(#[$fm:meta])*] $f:ident : $t:ty => $spec:block, $doc:literal))*]) => {
        $(#[$m])*
        #[derive(Clone, Debug, ::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        $vis struct $name {
            $(
                $(#[$fm])*
                #[doc = $doc]
                pub $f: $t,
            )*
        }

        impl $crate::kinds::params::KindParams for $name {
            fn specs() -> ::std::vec::Vec<::fpipe_engine::ParamSpec> {
                let mut specs = ::std::vec::Vec::new();
                $( $crate::kinds::params::kind_params!(@spec $what specs $spec); )*
                specs
            }
            fn nest(map: &mut ::serde_json::Map<::std::string::String, ::serde_json::Value>) {
                $( $crate::kinds::params::kind_params!(@nest $what map $f $t); )*
                let _ = map;
            }
            fn explain(
                map: &::serde_json::Map<::std::string::String, ::serde_json::Value>,
            ) -> ::std::option::Option<::std::string::String> {
                $(
                    if let ::std::option::Option::Some(e) =
                        $crate::kinds::params::kind_params!(@explain $what map $f $t)
                    {
                        return ::std::option::Option::Some(e);
                    }
                )*
                ::std::option::Option::None
            }
        }

        impl $name {
            /// The declared parameters, in order.
            pub fn specs() -> ::std::vec::Vec<::fpipe_engine::ParamSpec> {
                <Self as $crate::kinds::params::KindParams>::specs()
            }
            /// Parses resolved parameters (every default filled by the engine).
            pub fn from_params(
                params: &::std::collections::BTreeMap<::std::string::String, ::serde_json::Value>,
            ) -> ::std::result::Result<Self, ::std::string::String> {
                <Self as $crate::kinds::params::KindParams>::from_params(params)
            }
        }
    };
    (@spec field $specs:ident $spec:block) => {
        $specs.push($spec)
    };
    (@spec group $specs:ident $spec:block) => {
        $specs.extend($spec)
    };
    (@nest field $map:ident $f:ident $t:ty) => {};
    (@nest group $map:ident $f:ident $t:ty) => {{
        let mut sub = $crate::kinds::params::take(
            $map,
            &<$t as $crate::kinds::params::KindParams>::specs(),
        );
        <$t as $crate::kinds::params::KindParams>::nest(&mut sub);
        $map.insert(
            ::std::string::String::from(stringify!($f)),
            ::serde_json::Value::Object(sub),
        );
    }};
    (@explain field $map:ident $f:ident $t:ty) => {
        $crate::kinds::params::explain_field::<$t>($map, stringify!($f))
    };
    (@explain group $map:ident $f:ident $t:ty) => {
        match $map.get(stringify!($f)) {
            ::std::option::Option::Some(::serde_json::Value::Object(sub)) => {
                <$t as $crate::kinds::params::KindParams>::explain(sub)
            }
            _ => ::std::option::Option::None,
        }
    };
}

pub(crate) use kind_params;

#[cfg(test)]
mod tests {
    // Not every generated item is used by the tests.
    #![allow(dead_code)]
    use super::*;
    use fpipe_engine::ParamType;
    use serde_json::json;

    kind_params! {
        /// A shared group.
        pub struct Inner {
            on_error: String = Enum(&["skip", "fail"]), default "fail", "what to do";
        }
    }

    kind_params! {
        /// A kind's parameters.
        pub struct Outer {
            path: String = Path { companions: &["idx"] }, required, "the file";
            ..read: Inner;
            size: usize = Int, default 112, "side";
            rates: Vec<f64> = List(Box::new(Float)), default [1e-4, 0.1], "rates";
            batch_size: i64 = Int, default 64, volatile, "batch";
        }
    }

    kind_params! {
        /// Two levels of groups.
        pub struct Twice {
            ..outer: Outer;
            alpha: f64 = Float, default 7.0, "weight";
        }
    }

    fn filled(specs: &[ParamSpec], given: Value) -> BTreeMap<String, Value> {
        let mut m: BTreeMap<String, Value> = specs
            .iter()
            .filter_map(|s| s.default.clone().map(|d| (s.name.to_string(), d)))
            .collect();
        if let Value::Object(g) = given {
            m.extend(g);
        }
        m
    }

    #[test]
    fn specs_follow_the_declaration_order_with_groups_spliced_in() {
        let s = Twice::specs();
        let names: Vec<&str> = s.iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            ["path", "on_error", "size", "rates", "batch_size", "alpha"]
        );
        assert_eq!(s[0].default, None);
        assert_eq!(
            s[0].ty,
            ParamType::Path {
                companions: &["idx"]
            }
        );
        assert_eq!(s[1].ty, ParamType::Enum(&["skip", "fail"]));
        assert_eq!(s[1].default, Some(json!("fail")));
        assert_eq!(s[3].default, Some(json!([1e-4, 0.1])));
        assert_eq!(s[3].ty, ParamType::List(Box::new(ParamType::Float)));
        assert!(s[4].volatile && !s[3].volatile);
        assert_eq!(s[5].default, Some(json!(7.0)));
        assert_eq!(s[5].doc, "weight");
    }

    #[test]
    fn a_flat_map_parses_into_nested_groups() {
        let m = filled(&Twice::specs(), json!({"path": "/x.rec", "size": 96}));
        let p = Twice::from_params(&m).unwrap();
        assert_eq!(p.outer.path, "/x.rec");
        assert_eq!(p.outer.read.on_error, "fail");
        assert_eq!(p.outer.size, 96);
        assert_eq!(p.outer.rates, vec![1e-4, 0.1]);
        assert_eq!(p.alpha, 7.0);
    }

    #[test]
    fn unknown_and_mistyped_parameters_are_rejected() {
        let m = filled(&Twice::specs(), json!({"path": "/x", "extra": 1}));
        let e = Twice::from_params(&m).unwrap_err();
        assert!(e.contains("unknown field `extra`"), "{e}");
        let m = filled(&Twice::specs(), json!({"path": "/x", "size": -3}));
        let e = Twice::from_params(&m).unwrap_err();
        assert!(e.starts_with("parameter `size`: "), "{e}");
        assert!(e.contains("-3"), "{e}");
        let m = filled(&Outer::specs(), json!({}));
        let e = Outer::from_params(&m).unwrap_err();
        assert!(e.contains("missing field `path`"), "{e}");
    }
}
