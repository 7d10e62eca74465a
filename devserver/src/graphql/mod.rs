//! The GraphQL endpoint as Magento's GraphQl controller answers it (shared/magento-other-paths.md
//! §1-4): `POST <graphql_path>` with `{"query","variables","operationName"}` (GET with the same
//! as URL parameters), the `Store` header, `generateCustomerToken` through the same login service
//! as REST, and the `{ customer { ... } }` query that validates a token; `generateCustomerTokenAsAdmin`
//! (Login as Customer, §5) with an admin token; and on the cloud service
//! `exchangeOtpForCustomerToken` (§9).
//!
//! What happens to one request, in Magento's order:
//! 1. the body (or GET's `variables`) is decoded as JSON;
//! 2. the `Store` header picks the store view (`default` in any case always does; an unknown
//!    code is refused);
//! 3. a POST must say `application/json`, a mutation must come by POST;
//! 4. from 2.4.8, any `Authorization: Bearer` token is read and validated before anything runs
//!    (a stale one fails even a login);
//! 5. the document is parsed and checked against the schema ([`plan`]);
//! 6. the root fields are resolved in order, each error an item with `locations`, `path` and
//!    `extensions.category`, its field `null` in `data`.
//!
//! Errors of steps 1-4 have no `locations`, `path` or `data`. Their HTTP status, and that of the
//! resolvers' errors, is what differs between the two [`GraphQlConvention`]s.

pub(crate) mod plan;
#[cfg(test)]
pub(crate) mod tests;

use std::time::Instant;

use hyper::Method;
use serde_json::{Map, Value as Json};

use self::plan::{At, Failure, LeafField, OpKind, Plan, Resolver};
use super::handler::{self, Caller, TokenProblem, MSG_SIGN_IN};
use super::render::Node;
use super::{Config, Refusal, Route, Shared, StoreInfo};

/// Which Magento release's GraphQL answers the server gives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GraphQlConvention {
    /// Up to 2.4.7: resolver errors answer 200 whatever their category; an error before execution
    /// (request body, `Store` header, content type, a mutation by GET) answers 500; an invalid or
    /// expired token is ignored (the request runs as a guest); an unconfirmed account's login gets
    /// the generic sign-in message.
    #[value(name = "2.4.7")]
    V2_4_7,
    /// 2.4.8 and later (LYNX-319): 401 when the first categorised error is
    /// `graphql-authentication`, 403 for `graphql-authorization`; errors before execution answer
    /// as the newest controller does (syntax 400, input 200, content type 415); a bearer token is
    /// validated before the resolvers; an unconfirmed account's login says so.
    #[default]
    #[value(name = "2.4.8")]
    V2_4_8,
}

const CATEGORY_AUTHENTICATION: &str = "graphql-authentication";
const CATEGORY_AUTHORIZATION: &str = "graphql-authorization";
const CATEGORY_INPUT: &str = "graphql-input";

const MSG_CUSTOMER_NOT_AUTHORIZED: &str = "The current customer isn't authorized.";
const MSG_LOCKED: &str = "The account is locked.";
const MSG_UNCONFIRMED: &str = "This account isn't confirmed. Verify and try again.";
const MSG_RECAPTCHA: &str = "ReCaptcha validation failed, please try again";
const MSG_CONTENT_TYPE: &str = "Request content type must be application/json";
const MSG_MUTATION_BY_GET: &str = "Mutation requests allowed only for POST requests";
/// What webonyx says for an exception that is not client-safe (production mode).
const MSG_INTERNAL: &str = "Internal server error";

impl TokenProblem {
    /// The reader's or validator's message, which 2.4.8's AuthorizationRequestValidator passes on.
    fn message(self) -> &'static str {
        match self {
            TokenProblem::Unreadable => "Composite reader could not read a token",
            TokenProblem::Expired => "Consumer key has expired",
            TokenProblem::Revoked => "User token has been revoked",
        }
    }
}

/// What the body (or URL) of a request to the endpoint holds, read before anything else (the
/// handler needs the operation and a login's email to record and count the request).
pub(crate) struct Incoming {
    read: Result<Result<Plan, Failure>, Undecodable>,
}

/// Why there is no GraphQL request to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Undecodable {
    /// A POST without a body: 2.4.7 fails decoding it; later versions take it as an empty query.
    EmptyBody,
    /// A POST body that is not JSON.
    Body,
    /// A GET whose `variables` parameter is not JSON.
    Variables,
}

impl Incoming {
    pub(crate) fn read(method: &Method, uri_query: Option<&str>, body: &[u8]) -> Incoming {
        let fields = if *method == Method::POST {
            if body.is_empty() {
                Err(Undecodable::EmptyBody)
            } else {
                match serde_json::from_slice::<Json>(body) {
                    Ok(Json::Object(m)) => Ok(m),
                    // PHP reads `query` from a list or a scalar as absent.
                    Ok(_) => Ok(Map::new()),
                    Err(_) => Err(Undecodable::Body),
                }
            }
        } else {
            let mut m = Map::new();
            for (k, v) in form_urlencoded::parse(uri_query.unwrap_or("").as_bytes()) {
                m.insert(k.into_owned(), Json::String(v.into_owned()));
            }
            match m.get("variables").and_then(Json::as_str).filter(|s| !s.is_empty()) {
                None => Ok(m),
                Some(text) => match serde_json::from_str::<Json>(text) {
                    Ok(v) => {
                        m.insert("variables".to_owned(), v);
                        Ok(m)
                    }
                    Err(_) => Err(Undecodable::Variables),
                },
            }
        };
        let read = fields.map(|m| {
            let query = m.get("query").and_then(Json::as_str).unwrap_or("");
            let variables = m.get("variables").and_then(Json::as_object).cloned().unwrap_or_default();
            let operation = m.get("operationName").and_then(Json::as_str).filter(|s| !s.is_empty());
            plan::plan(query, &variables, operation)
        });
        Incoming { read }
    }

    /// What the request is aimed at: a login, Login as Customer, a code's exchange, a customer
    /// query, or anything else.
    pub(crate) fn route(&self) -> Route {
        match &self.read {
            Ok(Ok(p)) if p.kind == OpKind::Mutation && p.login().is_some() => Route::GraphQlLogin,
            Ok(Ok(p)) if p.kind == OpKind::Mutation && p.login_as_admin().is_some() => Route::GraphQlLoginAsAdmin,
            Ok(Ok(p)) if p.kind == OpKind::Mutation && p.otp_exchange().is_some() => Route::GraphQlOtpExchange,
            Ok(Ok(p)) if p.queries_customer() => Route::GraphQlCustomer,
            _ => Route::GraphQlOther,
        }
    }

    /// What the request record keeps: a login's email and password; the customer email of Login
    /// as Customer or of a code's exchange (never the code).
    pub(crate) fn recorded(&self) -> (Option<String>, Option<String>) {
        let Ok(Ok(p)) = &self.read else {
            return (None, None);
        };
        if p.kind != OpKind::Mutation {
            return (None, None);
        }
        match (p.login(), p.login_as_admin().or(p.otp_exchange())) {
            (Some((u, pw)), _) => (Some(u.to_owned()), Some(pw.to_owned())),
            (None, Some(email)) => (Some(email.to_owned()), None),
            (None, None) => (None, None),
        }
    }
}

/// The headers the endpoint reads.
pub(crate) struct Headers<'a> {
    pub(crate) method: &'a Method,
    pub(crate) content_type: Option<&'a str>,
    pub(crate) store: Option<&'a str>,
    pub(crate) authorization: Option<&'a str>,
}

/// Status and body (always `application/json`; none for OPTIONS and other methods).
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Option<Node>,
}

/// An error raised before execution.
enum Early {
    /// GraphQlInputException: the `Store` header, a mutation by GET.
    Input(String),
    /// The content type (UnsupportedMediaTypeException in the newest controller).
    MediaType,
    /// 2.4.8's token validation (GraphQlAuthenticationException).
    Authentication(&'static str),
    /// The body or the GET variables are not JSON.
    Undecodable(Undecodable),
    /// webonyx's SyntaxError.
    Syntax(String, At),
}

fn item(message: &str, extra: Vec<(&'static str, Node)>) -> Node {
    let mut fields = vec![("message", Node::str(message))];
    fields.extend(extra);
    Node::Map(fields)
}

fn category(name: &'static str) -> (&'static str, Node) {
    ("extensions", Node::Map(vec![("category", Node::str(name))]))
}

fn locations(at: At) -> (&'static str, Node) {
    (
        "locations",
        Node::List(vec![Node::Map(vec![("line", Node::Int(at.line as i64)), ("column", Node::Int(at.column as i64))])]),
    )
}

fn errors_only(status: u16, error: Node) -> Answer {
    Answer { status, body: Some(Node::Map(vec![("errors", Node::List(vec![error]))])) }
}

impl GraphQlConvention {
    /// The answer to an error raised before execution.
    fn early(self, error: Early) -> Answer {
        use GraphQlConvention::{V2_4_7, V2_4_8};
        match (self, error) {
            (_, Early::Syntax(message, at)) => errors_only(400, item(&message, vec![locations(at)])),
            (V2_4_7, Early::Input(message)) => errors_only(500, item(&message, vec![category(CATEGORY_INPUT)])),
            (V2_4_8, Early::Input(message)) => errors_only(200, item(&message, vec![category(CATEGORY_INPUT)])),
            (V2_4_7, Early::MediaType) => errors_only(500, item(MSG_CONTENT_TYPE, vec![category(CATEGORY_INPUT)])),
            (V2_4_8, Early::MediaType) => errors_only(415, item(MSG_CONTENT_TYPE, Vec::new())),
            (_, Early::Authentication(message)) => {
                errors_only(401, item(message, vec![category(CATEGORY_AUTHENTICATION)]))
            }
            // 2.4.7 decodes outside its try block: whatever the front controller makes of it.
            (V2_4_7, Early::Undecodable(_)) => errors_only(500, item(MSG_INTERNAL, Vec::new())),
            (V2_4_8, Early::Undecodable(Undecodable::EmptyBody)) => {
                self.early(Early::Syntax("Syntax Error: Unexpected <EOF>".to_owned(), At { line: 1, column: 1 }))
            }
            (V2_4_8, Early::Undecodable(Undecodable::Body)) => self.early(Early::Syntax(
                "Syntax Error: Unable to parse the request.".to_owned(),
                At { line: 1, column: 1 },
            )),
            (V2_4_8, Early::Undecodable(Undecodable::Variables)) => self.early(Early::Syntax(
                "Syntax Error: Unable to parse the variables.".to_owned(),
                At { line: 1, column: 1 },
            )),
        }
    }

    /// The status of an executed request: always 200 up to 2.4.7; from 2.4.8 by the first
    /// error that has a category.
    fn status(self, categories: &[&'static str]) -> u16 {
        match self {
            GraphQlConvention::V2_4_7 => 200,
            GraphQlConvention::V2_4_8 => match categories.first().copied() {
                Some(CATEGORY_AUTHENTICATION) => 401,
                Some(CATEGORY_AUTHORIZATION) => 403,
                _ => 200,
            },
        }
    }
}

/// StoreProcessor: the header trimmed, an existing store-view code (case as stored), or
/// `default` in any case; absent or empty means the default store view. `Err` is the code.
fn store_of<'c>(cfg: &'c Config, header: Option<&str>) -> Result<&'c StoreInfo, String> {
    let Some(raw) = header.filter(|h| !h.is_empty()) else {
        return Ok(&cfg.default_store);
    };
    let code = raw.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r' | '\0' | '\x0b'));
    match cfg.stores.get(code) {
        Some(store) => Ok(store),
        None if code.eq_ignore_ascii_case("default") => Ok(&cfg.default_store),
        None => Err(code.to_owned()),
    }
}

/// Answers one request to the endpoint.
pub(crate) fn answer(shared: &Shared, headers: &Headers<'_>, incoming: Incoming) -> Answer {
    let conv = shared.cfg.graphql.convention;
    if !matches!(*headers.method, Method::GET | Method::POST) {
        // The controller validates, then runs nothing: no body.
        let status = if *headers.method == Method::OPTIONS || conv == GraphQlConvention::V2_4_7 { 204 } else { 200 };
        return Answer { status, body: None };
    }
    let planned = match incoming.read {
        Ok(planned) => planned,
        Err(undecodable) => return conv.early(Early::Undecodable(undecodable)),
    };
    let store = match store_of(&shared.cfg, headers.store) {
        Ok(store) => store,
        Err(code) => return conv.early(Early::Input(format!("Store code {code} does not exist"))),
    };
    if *headers.method == Method::POST && !headers.content_type.unwrap_or("").contains("application/json") {
        return conv.early(Early::MediaType);
    }
    if *headers.method == Method::GET {
        // HttpVerbValidator parses the query itself to find the operation's type.
        match &planned {
            Ok(p) if p.kind == OpKind::Mutation => return conv.early(Early::Input(MSG_MUTATION_BY_GET.to_owned())),
            Err(Failure::Syntax { message, at }) => return conv.early(Early::Syntax(message.clone(), *at)),
            _ => {}
        }
    }
    let token = handler::bearer(headers.authorization);
    let user = match (conv, token) {
        (_, None) => None,
        (GraphQlConvention::V2_4_7, Some(t)) => handler::caller_state(shared, t).ok(),
        (GraphQlConvention::V2_4_8, Some(t)) => match handler::caller_state(shared, t) {
            Ok(caller) => Some(caller),
            Err(problem) => return conv.early(Early::Authentication(problem.message())),
        },
    };
    let plan = match planned {
        // The Cloud Service's schema alone has the exchange of a one-time code.
        Ok(plan) if shared.cfg.cloud_base.is_none() => {
            match plan.fields.iter().find(|f| matches!(f.resolver, Resolver::ExchangeOtp { .. })) {
                Some(f) => {
                    let message = "Cannot query field \"exchangeOtpForCustomerToken\" on type \"Mutation\".";
                    return errors_only(200, item(message, vec![locations(f.at)]));
                }
                None => plan,
            }
        }
        Ok(plan) => plan,
        Err(Failure::Syntax { message, at }) => return conv.early(Early::Syntax(message, at)),
        Err(Failure::Invalid { message, at }) => {
            return errors_only(200, item(&message, at.map(locations).into_iter().collect()));
        }
    };
    execute(shared, conv, store, user, plan)
}

/// A resolver's error: its message and category.
type FieldError = (&'static str, &'static str);

fn execute(shared: &Shared, conv: GraphQlConvention, store: &StoreInfo, user: Option<Caller>, plan: Plan) -> Answer {
    let mut data = Vec::with_capacity(plan.fields.len());
    let mut errors = Vec::new();
    let mut categories = Vec::new();
    for field in plan.fields {
        let resolved = match &field.resolver {
            Resolver::Typename(name) => Ok(Node::str(*name)),
            Resolver::GenerateCustomerToken { email, password, select } => {
                generate_customer_token(shared, conv, store, email, password).map(|token| {
                    leaves(select, "CustomerToken", |leaf| match leaf {
                        LeafField::Token => Node::str(token.as_str()),
                        _ => Node::Null,
                    })
                })
            }
            Resolver::Customer { select } => customer(shared, store, user, select),
            Resolver::GenerateCustomerTokenAsAdmin { email, select } => {
                generate_customer_token_as_admin(shared, store, user, email).map(|token| {
                    leaves(select, "GenerateCustomerTokenAsAdminOutput", |leaf| match leaf {
                        LeafField::CustomerToken => Node::str(token.as_str()),
                        _ => Node::Null,
                    })
                })
            }
            Resolver::ExchangeOtp { email, otp, select } => exchange_otp(shared, store, email, otp).map(|token| {
                leaves(select, "CustomerToken", |leaf| match leaf {
                    LeafField::Token => Node::str(token.as_str()),
                    _ => Node::Null,
                })
            }),
        };
        match resolved {
            Ok(node) => data.push((field.key, node)),
            Err((message, cat)) => {
                errors.push(item(
                    message,
                    vec![locations(field.at), ("path", Node::List(vec![Node::str(field.key.as_str())])), category(cat)],
                ));
                categories.push(cat);
                data.push((field.key, Node::Null));
            }
        }
    }
    let status = conv.status(&categories);
    let mut body = Vec::with_capacity(2);
    if !errors.is_empty() {
        body.push(("errors", Node::List(errors)));
    }
    body.push(("data", Node::Obj(data)));
    Answer { status, body: Some(Node::Map(body)) }
}

fn leaves(select: &[plan::Leaf], typename: &'static str, value: impl Fn(LeafField) -> Node) -> Node {
    Node::Obj(
        select
            .iter()
            .map(|leaf| {
                let v = match leaf.field {
                    LeafField::Typename => Node::str(typename),
                    other => value(other),
                };
                (leaf.key.clone(), v)
            })
            .collect(),
    )
}

/// CustomerGraphQl's GenerateCustomerToken resolver, behind security-package's reCAPTCHA plugin:
/// the captcha (no `X-ReCaptcha` value passes: this server has no reCAPTCHA service), the empty
/// arguments, then the REST login's service itself (throttle row, customer lock, token).
fn generate_customer_token(
    shared: &Shared,
    conv: GraphQlConvention,
    store: &StoreInfo,
    email: &str,
    password: &str,
) -> Result<String, FieldError> {
    if shared.recaptcha.load(std::sync::atomic::Ordering::Relaxed) {
        return Err((MSG_RECAPTCHA, CATEGORY_INPUT));
    }
    if email.is_empty() {
        return Err(("Specify the \"email\" value.", CATEGORY_INPUT));
    }
    if password.is_empty() {
        return Err(("Specify the \"password\" value.", CATEGORY_INPUT));
    }
    match handler::login(shared, store, email, password) {
        Ok(token) => Ok(token),
        Err(Refusal::Unconfirmed) if conv == GraphQlConvention::V2_4_8 => {
            Err((MSG_UNCONFIRMED, CATEGORY_AUTHENTICATION))
        }
        Err(Refusal::SignIn | Refusal::Unconfirmed) => Err((MSG_SIGN_IN, CATEGORY_AUTHENTICATION)),
    }
}

/// CustomerGraphQl's Customer resolver and GetCustomer: a guest is not authorized, and neither is
/// a customer of another website than the `Store` header's (how Magento refuses that is
/// UNCONFIRMED; see magento-other-paths.md §4); then the customer's lock and confirmation.
fn customer(
    shared: &Shared,
    store: &StoreInfo,
    user: Option<Caller>,
    select: &[plan::Leaf],
) -> Result<Node, FieldError> {
    let not_authorized = (MSG_CUSTOMER_NOT_AUTHORIZED, CATEGORY_AUTHORIZATION);
    let Some(Caller::Customer(uid)) = user else {
        return Err(not_authorized);
    };
    let st = shared.lock();
    let c = st.customers.get(&uid).ok_or(not_authorized)?;
    if store.all || store.website != c.website {
        return Err(not_authorized);
    }
    if c.lockout.is_locked(Instant::now()) {
        return Err((MSG_LOCKED, CATEGORY_AUTHENTICATION));
    }
    if !c.confirmed {
        return Err((MSG_UNCONFIRMED, CATEGORY_AUTHENTICATION));
    }
    Ok(leaves(select, "Customer", |leaf| match leaf {
        LeafField::Email => Node::str(c.email.as_str()),
        LeafField::Firstname => Node::str(c.firstname.as_str()),
        LeafField::Lastname => Node::str("Customer"),
        _ => Node::Null,
    }))
}

/// LoginAsCustomerGraphQl's RequestCustomerToken and CreateCustomerToken, checks in their order:
/// a blank email, a caller that is not an admin, the Login as Customer setting or the `login`
/// ACL, the `allow_shopping_assistance` ACL, the email in the `Store` header's website (then, when
/// told to check it as the docs say, the customer's own opt-in, UNCONFIRMED wording); an opaque
/// token. No password: no throttle, no reCAPTCHA.
fn generate_customer_token_as_admin(
    shared: &Shared,
    store: &StoreInfo,
    user: Option<Caller>,
    email: &str,
) -> Result<String, FieldError> {
    use std::sync::atomic::Ordering::Relaxed;
    if email.trim().is_empty() {
        return Err(("Specify the \"customer email\" value.", CATEGORY_INPUT));
    }
    let Some(Caller::Admin(admin_id)) = user else {
        return Err((MSG_CUSTOMER_NOT_AUTHORIZED, CATEGORY_AUTHORIZATION));
    };
    let uid = {
        let mut st = shared.lock();
        let (login, assistance) =
            st.issuers.admin_by_id(admin_id).map_or((false, false), |a| (a.acl_login, a.acl_assistance));
        if !login || !shared.login_as_customer.load(Relaxed) {
            return Err(("Login as Customer is disabled.", CATEGORY_AUTHORIZATION));
        }
        if !assistance {
            return Err(("Allow remote shopping assistance is disabled.", CATEGORY_AUTHORIZATION));
        }
        let customer = match store.all {
            true => None,
            false => st.lookup_mut(&store.website, &email.trim().to_lowercase()).map(|c| (c.id, c.assistance_allowed)),
        };
        let Some((id, assistance_allowed)) = customer else {
            return Err(("Customer email provided does not exist", CATEGORY_INPUT));
        };
        if shared.check_assistance.load(Relaxed) && !assistance_allowed {
            return Err(("The customer has not allowed remote shopping assistance.", CATEGORY_AUTHORIZATION));
        }
        st.issuers.counts.login_as_customer_tokens += 1;
        id
    };
    Ok(handler::mint_opaque_customer_token(shared, uid))
}

/// The Cloud Service's `exchangeOtpForCustomerToken`: reCAPTCHA as for logins, the empty
/// arguments, then the code (unknown or used, expired, another customer's), all
/// `graphql-authentication` (wording UNCONFIRMED).
fn exchange_otp(shared: &Shared, store: &StoreInfo, email: &str, otp: &str) -> Result<String, FieldError> {
    if shared.recaptcha.load(std::sync::atomic::Ordering::Relaxed) {
        return Err((MSG_RECAPTCHA, CATEGORY_INPUT));
    }
    if email.is_empty() {
        return Err(("Specify the \"email\" value.", CATEGORY_INPUT));
    }
    if otp.is_empty() {
        return Err(("Specify the \"otp\" value.", CATEGORY_INPUT));
    }
    super::cloud::exchange(shared, store, email, otp).map_err(|message| (message, CATEGORY_AUTHENTICATION))
}
