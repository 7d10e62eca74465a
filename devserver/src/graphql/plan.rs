//! What a GraphQL document asks of this server's small schema, checked the way webonyx/graphql-php
//! (Magento's GraphQL engine) checks it before anything runs.
//!
//! The document is parsed by `graphql-parser`; this module only walks the chosen operation and
//! turns it into a [`Plan`]: the root fields to resolve, in order, each with its arguments already
//! read from literals or variables. The schema is the part of Magento's that the daemon uses:
//!
//! ```graphql
//! type Mutation {
//!   generateCustomerToken(email: String!, password: String!): CustomerToken
//!   generateCustomerTokenAsAdmin(input: GenerateCustomerTokenAsAdminInput!): GenerateCustomerTokenAsAdminOutput
//!   exchangeOtpForCustomerToken(email: String!, otp: String!): CustomerToken   # cloud service only
//! }
//! input GenerateCustomerTokenAsAdminInput { customer_email: String! }
//! type GenerateCustomerTokenAsAdminOutput { customer_token: String! }
//! type CustomerToken { token: String }
//! type Query { customer: Customer }
//! type Customer { email: String firstname: String lastname: String }
//! ```
//!
//! plus `__typename` everywhere. Whatever else a document names is refused as an unknown field,
//! argument or type, with webonyx's message; Magento outside developer mode reports only the first
//! validation error, and so does this. Fragments and directives are valid GraphQL that this server
//! does not model: they get an error saying so rather than a guess. Messages follow webonyx 15's
//! wording as far as it is known; syntax errors carry `graphql-parser`'s description of what was
//! unexpected, not webonyx's.

use std::collections::HashSet;

use graphql_parser::query::{
    self as q, Definition, Field, OperationDefinition, Selection, SelectionSet, Type, Value, VariableDefinition,
};
use serde_json::{Map, Value as Json};

/// A position in the query text, one-based (`locations` of an error item).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct At {
    pub(crate) line: usize,
    pub(crate) column: usize,
}

impl From<graphql_parser::Pos> for At {
    fn from(p: graphql_parser::Pos) -> At {
        At { line: p.line, column: p.column }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Query,
    Mutation,
}

impl OpKind {
    fn root_type(self) -> &'static str {
        match self {
            OpKind::Query => "Query",
            OpKind::Mutation => "Mutation",
        }
    }
}

/// The operation to run: its root fields in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) kind: OpKind,
    pub(crate) fields: Vec<RootField>,
}

impl Plan {
    /// The arguments of the first `generateCustomerToken` in a mutation.
    pub(crate) fn login(&self) -> Option<(&str, &str)> {
        self.fields.iter().find_map(|f| match &f.resolver {
            Resolver::GenerateCustomerToken { email, password, .. } => Some((email.as_str(), password.as_str())),
            _ => None,
        })
    }

    /// The `customer_email` of the first `generateCustomerTokenAsAdmin` in a mutation.
    pub(crate) fn login_as_admin(&self) -> Option<&str> {
        self.fields.iter().find_map(|f| match &f.resolver {
            Resolver::GenerateCustomerTokenAsAdmin { email, .. } => Some(email.as_str()),
            _ => None,
        })
    }

    /// The `email` of the first `exchangeOtpForCustomerToken` in a mutation.
    pub(crate) fn otp_exchange(&self) -> Option<&str> {
        self.fields.iter().find_map(|f| match &f.resolver {
            Resolver::ExchangeOtp { email, .. } => Some(email.as_str()),
            _ => None,
        })
    }

    pub(crate) fn queries_customer(&self) -> bool {
        self.fields.iter().any(|f| matches!(f.resolver, Resolver::Customer { .. }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootField {
    /// The response key: the alias, else the field's name.
    pub(crate) key: String,
    pub(crate) at: At,
    pub(crate) resolver: Resolver,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolver {
    /// `__typename` on the root: the root type's name.
    Typename(&'static str),
    GenerateCustomerToken {
        email: String,
        password: String,
        select: Vec<Leaf>,
    },
    Customer {
        select: Vec<Leaf>,
    },
    GenerateCustomerTokenAsAdmin {
        email: String,
        select: Vec<Leaf>,
    },
    ExchangeOtp {
        email: String,
        otp: String,
        select: Vec<Leaf>,
    },
}

/// A scalar field selected below a root field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Leaf {
    pub(crate) key: String,
    pub(crate) field: LeafField,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeafField {
    Typename,
    Token,
    CustomerToken,
    Email,
    Firstname,
    Lastname,
}

/// Why there is nothing to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The text is not GraphQL: webonyx's `SyntaxError`, which Magento answers with 400.
    Syntax { message: String, at: At },
    /// Valid GraphQL that does not fit the schema, or names no operation to run, or variables
    /// that do not fit their declarations: an error item without `path` or `extensions`, no data.
    Invalid { message: String, at: Option<At> },
}

impl Failure {
    fn invalid(message: impl Into<String>, at: impl Into<Option<At>>) -> Failure {
        Failure::Invalid { message: message.into(), at: at.into() }
    }
}

const UNMODELLED: &str = "magento-devserver does not model GraphQL fragments or directives";

/// The composite types of the schema and the scalar fields each has.
struct Composite {
    name: &'static str,
    leaves: &'static [(&'static str, LeafField)],
}

const CUSTOMER_TOKEN: Composite = Composite { name: "CustomerToken", leaves: &[("token", LeafField::Token)] };
const AS_ADMIN_OUTPUT: Composite =
    Composite { name: "GenerateCustomerTokenAsAdminOutput", leaves: &[("customer_token", LeafField::CustomerToken)] };
/// The input object of `generateCustomerTokenAsAdmin`.
pub(crate) const AS_ADMIN_INPUT: &str = "GenerateCustomerTokenAsAdminInput";
const CUSTOMER: Composite = Composite {
    name: "Customer",
    leaves: &[("email", LeafField::Email), ("firstname", LeafField::Firstname), ("lastname", LeafField::Lastname)],
};

/// Parses `query`, picks the operation (`operation_name`, or the only one) and checks it against
/// the schema and `variables`.
pub(crate) fn plan(query: &str, variables: &Map<String, Json>, operation_name: Option<&str>) -> Result<Plan, Failure> {
    if query.trim().is_empty() {
        return Err(Failure::Syntax {
            message: "Syntax Error: Unexpected <EOF>".to_owned(),
            at: At { line: 1, column: 1 },
        });
    }
    let doc = q::parse_query::<&str>(query).map_err(|e| syntax_failure(&e.to_string()))?;
    let mut operations = Vec::new();
    for definition in &doc.definitions {
        match definition {
            Definition::Operation(op) => operations.push(op),
            Definition::Fragment(f) => return Err(Failure::invalid(UNMODELLED, At::from(f.position))),
        }
    }
    let op = choose(&operations, operation_name)?;
    let (kind, name, defs, directives, selection, at) = match op {
        OperationDefinition::SelectionSet(s) => (OpKind::Query, None, &[][..], &[][..], s, At::from(s.span.0)),
        OperationDefinition::Query(o) => {
            (OpKind::Query, o.name, &o.variable_definitions[..], &o.directives[..], &o.selection_set, o.position.into())
        }
        OperationDefinition::Mutation(o) => (
            OpKind::Mutation,
            o.name,
            &o.variable_definitions[..],
            &o.directives[..],
            &o.selection_set,
            o.position.into(),
        ),
        OperationDefinition::Subscription(o) => {
            return Err(Failure::invalid(
                "Schema is not configured to execute subscription operation.",
                At::from(o.position),
            ))
        }
    };
    if !directives.is_empty() {
        return Err(Failure::invalid(UNMODELLED, at));
    }
    let mut walk = Walk { op_name: name, defs, variables, used: HashSet::new(), coerce: Vec::new() };
    walk.check_declarations()?;
    let mut fields = Vec::new();
    for item in &selection.items {
        let field = only_field(item)?;
        fields.push(walk.root_field(kind, field)?);
    }
    walk.check_all_used()?;
    // Variable values are coerced once the document is valid (webonyx's getVariableValues).
    if let Some(failure) = walk.coerce.into_iter().next() {
        return Err(failure);
    }
    Ok(Plan { kind, fields })
}

fn choose<'d, 'a>(
    operations: &[&'d OperationDefinition<'a, &'a str>],
    wanted: Option<&str>,
) -> Result<&'d OperationDefinition<'a, &'a str>, Failure> {
    let name_of = |op: &OperationDefinition<'a, &'a str>| match op {
        OperationDefinition::SelectionSet(_) => None,
        OperationDefinition::Query(o) => o.name,
        OperationDefinition::Mutation(o) => o.name,
        OperationDefinition::Subscription(o) => o.name,
    };
    match wanted {
        Some(wanted) => operations
            .iter()
            .copied()
            .find(|op| name_of(op) == Some(wanted))
            .ok_or_else(|| Failure::invalid(format!("Unknown operation named \"{wanted}\"."), None)),
        None => match operations {
            [] => Err(Failure::invalid("Must provide an operation.", None)),
            [only] => Ok(only),
            _ => Err(Failure::invalid("Must provide operation name if query contains multiple operations.", None)),
        },
    }
}

fn only_field<'d, 'a>(item: &'d Selection<'a, &'a str>) -> Result<&'d Field<'a, &'a str>, Failure> {
    match item {
        Selection::Field(f) if f.directives.is_empty() => Ok(f),
        Selection::Field(f) => Err(Failure::invalid(UNMODELLED, At::from(f.position))),
        Selection::FragmentSpread(s) => Err(Failure::invalid(UNMODELLED, At::from(s.position))),
        Selection::InlineFragment(s) => Err(Failure::invalid(UNMODELLED, At::from(s.position))),
    }
}

/// `graphql-parser` says `query parse error: Parse error at L:C` and then what was unexpected.
fn syntax_failure(text: &str) -> Failure {
    let at = text
        .split_once("Parse error at ")
        .and_then(|(_, rest)| {
            let pos = rest.split(|c: char| c.is_whitespace()).next()?;
            let (line, column) = pos.split_once(':')?;
            Some(At { line: line.parse().ok()?, column: column.parse().ok()? })
        })
        .unwrap_or(At { line: 1, column: 1 });
    let what = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("Unexpected "))
        .map(|token| match token.strip_prefix('`').and_then(|t| t.strip_suffix('`')) {
            // "`}[Punctuator]`": the token as webonyx names it, without its kind.
            Some(quoted) => quoted.rsplit_once('[').map_or(quoted, |(t, _)| t).to_owned(),
            None => token.replace("end of input", "<EOF>"),
        })
        .unwrap_or_else(|| "input".to_owned());
    Failure::Syntax { message: format!("Syntax Error: Unexpected {what}"), at }
}

/// The walk over one operation: its variable declarations, the values the request gave them,
/// which of them were used, and the coercion failures found on the way (reported only when the
/// document itself is valid).
struct Walk<'d, 'a> {
    op_name: Option<&'a str>,
    defs: &'d [VariableDefinition<'a, &'a str>],
    variables: &'d Map<String, Json>,
    used: HashSet<&'a str>,
    coerce: Vec<Failure>,
}

impl<'d, 'a> Walk<'d, 'a> {
    /// KnownTypeNames and UniqueVariableNames over the declarations.
    fn check_declarations(&self) -> Result<(), Failure> {
        let mut seen = HashSet::new();
        for def in self.defs {
            if !seen.insert(def.name) {
                return Err(Failure::invalid(
                    format!("There can be only one variable named \"${}\".", def.name),
                    At::from(def.position),
                ));
            }
            let mut inner = &def.var_type;
            while let Type::NonNullType(t) | Type::ListType(t) = inner {
                inner = t;
            }
            if let Type::NamedType(name) = inner {
                if !matches!(*name, "String" | "Int" | "Float" | "Boolean" | "ID" | AS_ADMIN_INPUT) {
                    return Err(Failure::invalid(format!("Unknown type \"{name}\"."), At::from(def.position)));
                }
            }
        }
        Ok(())
    }

    /// NoUnusedVariables.
    fn check_all_used(&self) -> Result<(), Failure> {
        match self.defs.iter().find(|d| !self.used.contains(d.name)) {
            None => Ok(()),
            Some(def) => {
                let message = match self.op_name {
                    Some(op) => format!("Variable \"${}\" is never used in operation \"{op}\".", def.name),
                    None => format!("Variable \"${}\" is never used.", def.name),
                };
                Err(Failure::invalid(message, At::from(def.position)))
            }
        }
    }

    fn root_field(&mut self, kind: OpKind, field: &Field<'a, &'a str>) -> Result<RootField, Failure> {
        let at = At::from(field.position);
        let key = field.alias.unwrap_or(field.name).to_owned();
        let root = kind.root_type();
        let resolver = match (kind, field.name) {
            (_, "__typename") => {
                no_arguments(field, root)?;
                no_selection(field, "String")?;
                Resolver::Typename(root)
            }
            (OpKind::Mutation, "generateCustomerToken") => {
                let select = leaves(field, &CUSTOMER_TOKEN)?;
                let [email, password] = self.string_arguments(field, ["email", "password"])?;
                Resolver::GenerateCustomerToken { email, password, select }
            }
            (OpKind::Mutation, "generateCustomerTokenAsAdmin") => {
                let select = leaves(field, &AS_ADMIN_OUTPUT)?;
                Resolver::GenerateCustomerTokenAsAdmin { email: self.as_admin_input(field)?, select }
            }
            (OpKind::Mutation, "exchangeOtpForCustomerToken") => {
                let select = leaves(field, &CUSTOMER_TOKEN)?;
                let [email, otp] = self.string_arguments(field, ["email", "otp"])?;
                Resolver::ExchangeOtp { email, otp, select }
            }
            (OpKind::Query, "customer") => {
                no_arguments(field, root)?;
                Resolver::Customer { select: leaves(field, &CUSTOMER)? }
            }
            (_, other) => {
                return Err(Failure::invalid(format!("Cannot query field \"{other}\" on type \"{root}\"."), at))
            }
        };
        Ok(RootField { key, at, resolver })
    }

    /// Two `String!` arguments (`email` and `password`, `email` and `otp`): KnownArgumentNames,
    /// UniqueArgumentNames, ValuesOfCorrectType, ProvidedRequiredArguments, NoUndefinedVariables
    /// and VariablesInAllowedPosition, in that order for each argument.
    fn string_arguments(&mut self, field: &Field<'a, &'a str>, names: [&str; 2]) -> Result<[String; 2], Failure> {
        let at = At::from(field.position);
        let mut first = None;
        let mut second = None;
        for (name, value) in &field.arguments {
            let slot = match *name {
                n if n == names[0] => &mut first,
                n if n == names[1] => &mut second,
                other => {
                    return Err(Failure::invalid(
                        format!("Unknown argument \"{other}\" on field \"{}\" of type \"Mutation\".", field.name),
                        at,
                    ))
                }
            };
            if slot.is_some() {
                return Err(Failure::invalid(format!("There can be only one argument named \"{name}\"."), at));
            }
            *slot = Some(self.string_argument(value, at)?);
        }
        let required = |arg: &str| {
            Failure::invalid(
                format!(
                    "Field \"{}\" argument \"{arg}\" of type \"String!\" is required, but it was not provided.",
                    field.name
                ),
                at,
            )
        };
        let first = first.ok_or_else(|| required(names[0]))?;
        let second = second.ok_or_else(|| required(names[1]))?;
        Ok([first, second])
    }

    /// `input: GenerateCustomerTokenAsAdminInput!`: an object literal whose `customer_email` is a
    /// string or a `String!` variable, or a variable of the input type whose value is an object
    /// with a string `customer_email`. Returns that email.
    fn as_admin_input(&mut self, field: &Field<'a, &'a str>) -> Result<String, Failure> {
        let at = At::from(field.position);
        let mut input = None;
        for (name, value) in &field.arguments {
            if *name != "input" {
                return Err(Failure::invalid(
                    format!("Unknown argument \"{name}\" on field \"{}\" of type \"Mutation\".", field.name),
                    at,
                ));
            }
            if input.is_some() {
                return Err(Failure::invalid("There can be only one argument named \"input\".", at));
            }
            input = Some(value);
        }
        let not_provided = || {
            Failure::invalid(
                format!(
                "Field \"{}\" argument \"input\" of type \"{AS_ADMIN_INPUT}!\" is required, but it was not provided.",
                field.name
            ),
                at,
            )
        };
        let email_missing = || {
            Failure::invalid(
                format!("Field \"{AS_ADMIN_INPUT}.customer_email\" of required type \"String!\" was not provided."),
                at,
            )
        };
        match input.ok_or_else(not_provided)? {
            Value::Object(fields) => {
                if let Some(other) = fields.keys().find(|k| k != &&"customer_email") {
                    return Err(Failure::invalid(
                        format!("Field \"{other}\" is not defined by type \"{AS_ADMIN_INPUT}\"."),
                        at,
                    ));
                }
                let value = fields.get(&"customer_email").ok_or_else(email_missing)?;
                self.string_argument(value, at)
            }
            Value::Variable(name) => self.input_variable(name, at),
            Value::Null => {
                Err(Failure::invalid(format!("Expected value of type \"{AS_ADMIN_INPUT}!\", found null."), at))
            }
            other => Err(Failure::invalid(format!("Expected value of type \"{AS_ADMIN_INPUT}!\", found {other}."), at)),
        }
    }

    /// The definition of the variable `name`, used at `at` (and marked used), or the error of
    /// one the operation does not define.
    fn definition(&mut self, name: &'a str, at: At) -> Result<&'d VariableDefinition<'a, &'a str>, Failure> {
        self.used.insert(name);
        self.defs.iter().find(|d| d.name == name).ok_or_else(|| {
            let message = match self.op_name {
                Some(op) => format!("Variable \"${name}\" is not defined by operation \"{op}\"."),
                None => format!("Variable \"${name}\" is not defined."),
            };
            Failure::invalid(message, at)
        })
    }

    /// A variable declared `GenerateCustomerTokenAsAdminInput!` standing for the whole input.
    fn input_variable(&mut self, name: &'a str, at: At) -> Result<String, Failure> {
        let def = self.definition(name, at)?;
        let declared = def.var_type.to_string();
        if !matches!(&def.var_type, Type::NonNullType(inner) if matches!(**inner, Type::NamedType(AS_ADMIN_INPUT))) {
            return Err(Failure::invalid(
                format!("Variable \"${name}\" of type \"{declared}\" used in position expecting type \"{AS_ADMIN_INPUT}!\"."),
                at,
            ));
        }
        let def_at = At::from(def.position);
        match self.variables.get(name) {
            Some(Json::Object(m)) => match m.get("customer_email") {
                Some(Json::String(s)) => return Ok(s.clone()),
                _ => self.coerce.push(Failure::invalid(
                    format!("Variable \"${name}\" got invalid value {}; Field \"customer_email\" of required type \"String!\" was not provided.", Json::Object(m.clone())),
                    def_at,
                )),
            },
            None => self.coerce.push(Failure::invalid(
                format!("Variable \"${name}\" of required type \"{declared}\" was not provided."),
                def_at,
            )),
            Some(other) => self.coerce.push(Failure::invalid(
                format!("Variable \"${name}\" got invalid value {other}; Expected type \"{AS_ADMIN_INPUT}\" to be an object."),
                def_at,
            )),
        }
        Ok(String::new())
    }

    /// A `String!` argument's value: a string literal, or a variable declared `String!` (or
    /// `String` with a non-null default) whose value is a string.
    fn string_argument(&mut self, value: &Value<'a, &'a str>, at: At) -> Result<String, Failure> {
        match value {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Err(Failure::invalid("Expected value of type \"String!\", found null.", at)),
            Value::Variable(name) => self.variable(name, at),
            other => Err(Failure::invalid(format!("String cannot represent a non string value: {other}"), at)),
        }
    }

    fn variable(&mut self, name: &'a str, at: At) -> Result<String, Failure> {
        let def = self.definition(name, at)?;
        let declared = def.var_type.to_string();
        let default = match &def.default_value {
            Some(Value::String(s)) => Some(s.as_str()),
            _ => None,
        };
        let allowed = match &def.var_type {
            Type::NonNullType(inner) => matches!(**inner, Type::NamedType("String")),
            Type::NamedType("String") => default.is_some(),
            _ => false,
        };
        if !allowed {
            return Err(Failure::invalid(
                format!("Variable \"${name}\" of type \"{declared}\" used in position expecting type \"String!\"."),
                at,
            ));
        }
        let def_at = At::from(def.position);
        let value = match (self.variables.get(name), default) {
            (Some(Json::String(s)), _) => s.clone(),
            (None, Some(d)) => d.to_owned(),
            (None, None) => {
                self.coerce.push(Failure::invalid(
                    format!("Variable \"${name}\" of required type \"{declared}\" was not provided."),
                    def_at,
                ));
                String::new()
            }
            (Some(Json::Null), _) => {
                self.coerce.push(Failure::invalid(
                    format!("Variable \"${name}\" of non-null type \"{declared}\" must not be null."),
                    def_at,
                ));
                String::new()
            }
            (Some(other), _) => {
                self.coerce.push(Failure::invalid(
                    format!("Variable \"${name}\" got invalid value {other}; String cannot represent a non string value: {other}"),
                    def_at,
                ));
                String::new()
            }
        };
        Ok(value)
    }
}

fn no_arguments<'a>(field: &Field<'a, &'a str>, parent: &str) -> Result<(), Failure> {
    match field.arguments.first() {
        None => Ok(()),
        Some((arg, _)) => Err(Failure::invalid(
            format!("Unknown argument \"{arg}\" on field \"{}\" of type \"{parent}\".", field.name),
            At::from(field.position),
        )),
    }
}

/// ScalarLeafs for a scalar field.
fn no_selection<'a>(field: &Field<'a, &'a str>, scalar: &str) -> Result<(), Failure> {
    if field.selection_set.items.is_empty() {
        return Ok(());
    }
    Err(Failure::invalid(
        format!("Field \"{}\" must not have a selection since type \"{scalar}\" has no subfields.", field.name),
        At::from(field.position),
    ))
}

/// The scalar fields selected below a field of a composite type.
fn leaves<'a>(field: &Field<'a, &'a str>, of: &Composite) -> Result<Vec<Leaf>, Failure> {
    let selection: &SelectionSet<'a, &'a str> = &field.selection_set;
    if selection.items.is_empty() {
        return Err(Failure::invalid(
            format!(
                "Field \"{name}\" of type \"{ty}\" must have a selection of subfields. Did you mean \"{name} {{ ... }}\"?",
                name = field.name,
                ty = of.name
            ),
            At::from(field.position),
        ));
    }
    let mut out = Vec::new();
    for item in &selection.items {
        let sub = only_field(item)?;
        let known = if sub.name == "__typename" {
            Some(LeafField::Typename)
        } else {
            of.leaves.iter().find(|(name, _)| *name == sub.name).map(|(_, f)| *f)
        };
        let Some(leaf) = known else {
            return Err(Failure::invalid(
                format!("Cannot query field \"{}\" on type \"{}\".", sub.name, of.name),
                At::from(sub.position),
            ));
        };
        no_arguments(sub, of.name)?;
        no_selection(sub, "String")?;
        out.push(Leaf { key: sub.alias.unwrap_or(sub.name).to_owned(), field: leaf });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Json) -> Map<String, Json> {
        v.as_object().cloned().unwrap_or_default()
    }

    fn invalid(query: &str, variables: Json) -> (String, Option<At>) {
        match plan(query, &vars(variables), None) {
            Err(Failure::Invalid { message, at }) => (message, at),
            other => panic!("{query}: {other:?}"),
        }
    }

    const LOGIN: &str = "mutation($e:String!,$p:String!){generateCustomerToken(email:$e,password:$p){token}}";

    #[test]
    fn the_daemons_login_with_variables() {
        let p = plan(LOGIN, &vars(json!({"e": "a@b.c", "p": "pw"})), None).unwrap();
        assert_eq!(p.kind, OpKind::Mutation);
        assert_eq!(p.login(), Some(("a@b.c", "pw")));
        assert_eq!(p.fields[0].key, "generateCustomerToken");
        assert_eq!(p.fields[0].at, At { line: 1, column: 33 });
        assert!(!p.queries_customer());
    }

    #[test]
    fn inline_arguments_aliases_and_typename() {
        let q = "mutation Login {\n  t: generateCustomerToken(password: \"p\\\"w\", email: \"a@b.c\") { token __typename }\n  __typename\n}";
        let p = plan(q, &Map::new(), None).unwrap();
        assert_eq!(p.login(), Some(("a@b.c", "p\"w")));
        assert_eq!(p.fields[0].key, "t");
        assert_eq!(p.fields[0].at, At { line: 2, column: 3 });
        match &p.fields[0].resolver {
            Resolver::GenerateCustomerToken { select, .. } => {
                assert_eq!(select.iter().map(|l| l.field).collect::<Vec<_>>(), [LeafField::Token, LeafField::Typename])
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.fields[1].resolver, Resolver::Typename("Mutation"));
    }

    #[test]
    fn the_customer_query_in_its_forms() {
        for q in [
            "{ customer { email } }",
            "query { customer { email firstname } }",
            "query Me { me: customer { e: email } }",
        ] {
            let p = plan(q, &Map::new(), None).unwrap();
            assert_eq!(p.kind, OpKind::Query, "{q}");
            assert!(p.queries_customer(), "{q}");
            assert_eq!(p.login(), None);
        }
    }

    #[test]
    fn operation_choice() {
        let two = "query A { customer { email } } mutation B { generateCustomerToken(email: \"a\", password: \"b\") { token } }";
        assert_eq!(plan(two, &Map::new(), Some("B")).unwrap().kind, OpKind::Mutation);
        assert_eq!(plan(two, &Map::new(), Some("A")).unwrap().kind, OpKind::Query);
        assert_eq!(invalid(two, json!({})).0, "Must provide operation name if query contains multiple operations.");
        match plan(two, &Map::new(), Some("C")) {
            Err(Failure::Invalid { message, .. }) => assert_eq!(message, "Unknown operation named \"C\"."),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let eof = "Syntax Error: Unexpected <EOF>";
        for (q, at, expected) in [
            ("", At { line: 1, column: 1 }, eof),
            ("{ customer { email }", At { line: 1, column: 21 }, eof),
            ("mutation {\n  x(", At { line: 2, column: 5 }, eof),
            ("{ customer { email } } }", At { line: 1, column: 24 }, "Syntax Error: Unexpected }"),
            ("{ a(b: \"c) }", At { line: 1, column: 8 }, "Syntax Error: Unexpected unterminated string value"),
        ] {
            match plan(q, &Map::new(), None) {
                Err(Failure::Syntax { message, at: got }) => {
                    assert_eq!((message.as_str(), got), (expected, at), "{q:?}")
                }
                other => panic!("{q:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn schema_errors_as_webonyx_words_them() {
        let cases: Vec<(&str, Json, &str)> = vec![
            ("{ cart { id } }", json!({}), "Cannot query field \"cart\" on type \"Query\"."),
            ("{ generateCustomerToken(email: \"a\", password: \"b\") { token } }", json!({}), "Cannot query field \"generateCustomerToken\" on type \"Query\"."),
            ("mutation { customer { email } }", json!({}), "Cannot query field \"customer\" on type \"Mutation\"."),
            ("{ customer { id } }", json!({}), "Cannot query field \"id\" on type \"Customer\"."),
            ("{ customer }", json!({}), "Field \"customer\" of type \"Customer\" must have a selection of subfields. Did you mean \"customer { ... }\"?"),
            ("{ customer(id: 1) { email } }", json!({}), "Unknown argument \"id\" on field \"customer\" of type \"Query\"."),
            ("{ customer { email { x } } }", json!({}), "Field \"email\" must not have a selection since type \"String\" has no subfields."),
            ("mutation { generateCustomerToken(email: \"a\", password: \"b\") }", json!({}), "Field \"generateCustomerToken\" of type \"CustomerToken\" must have a selection of subfields. Did you mean \"generateCustomerToken { ... }\"?"),
            ("mutation { generateCustomerToken(email: \"a\", password: \"b\") { token expires } }", json!({}), "Cannot query field \"expires\" on type \"CustomerToken\"."),
            ("mutation { generateCustomerToken(email: \"a\") { token } }", json!({}), "Field \"generateCustomerToken\" argument \"password\" of type \"String!\" is required, but it was not provided."),
            ("mutation { generateCustomerToken(email: \"a\", password: \"b\", store: \"c\") { token } }", json!({}), "Unknown argument \"store\" on field \"generateCustomerToken\" of type \"Mutation\"."),
            ("mutation { generateCustomerToken(email: \"a\", email: \"b\", password: \"c\") { token } }", json!({}), "There can be only one argument named \"email\"."),
            ("mutation { generateCustomerToken(email: 5, password: \"b\") { token } }", json!({}), "String cannot represent a non string value: 5"),
            ("mutation { generateCustomerToken(email: null, password: \"b\") { token } }", json!({}), "Expected value of type \"String!\", found null."),
            ("mutation M { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": "a"}), "Variable \"$e\" is not defined by operation \"M\"."),
            ("mutation($e: String!, $x: String) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": "a"}), "Variable \"$x\" is never used."),
            ("mutation($e: Int!) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": 1}), "Variable \"$e\" of type \"Int!\" used in position expecting type \"String!\"."),
            ("mutation($e: String) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": "a"}), "Variable \"$e\" of type \"String\" used in position expecting type \"String!\"."),
            ("mutation($e: Strin!) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": "a"}), "Unknown type \"Strin\"."),
            ("mutation($e: String!) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({}), "Variable \"$e\" of required type \"String!\" was not provided."),
            ("mutation($e: String!) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": null}), "Variable \"$e\" of non-null type \"String!\" must not be null."),
            ("mutation($e: String!) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({"e": 7}), "Variable \"$e\" got invalid value 7; String cannot represent a non string value: 7"),
            ("subscription { customer { email } }", json!({}), "Schema is not configured to execute subscription operation."),
            ("{ ...F } fragment F on Query { customer { email } }", json!({}), UNMODELLED),
            ("{ customer { ... on Customer { email } } }", json!({}), UNMODELLED),
            ("{ customer @include(if: true) { email } }", json!({}), UNMODELLED),
        ];
        for (q, v, expected) in cases {
            assert_eq!(invalid(q, v).0, expected, "{q}");
        }
        // A nullable variable with a default stands in for a required argument.
        let q = "mutation($e: String = \"d@e.f\") { generateCustomerToken(email: $e, password: \"b\") { token } }";
        assert_eq!(plan(q, &Map::new(), None).unwrap().login(), Some(("d@e.f", "b")));
        // Locations point at the field or the declaration.
        assert_eq!(invalid("{\n  customer { id }\n}", json!({})).1, Some(At { line: 2, column: 14 }));
        assert_eq!(
            invalid("mutation($e: String!) { generateCustomerToken(email: $e, password: \"b\") { token } }", json!({}))
                .1,
            Some(At { line: 1, column: 10 })
        );
    }
}
