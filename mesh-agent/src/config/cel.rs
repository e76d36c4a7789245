//! CEL expressions of the Telemetry API (access log filters, metric label values),
//! compiled and run through one door: the CEL parser panics on some malformed input
//! (`request.host +`), and an expression from a user's configuration must be an error
//! that names it, never a crashed agent.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cel_interpreter::{Context, ExecutionError, Program, Value};
use serde::Serialize;

/// A compiled expression, compared, hashed and shown by its text (a compiled program
/// has no equality of its own): two rules with the same expression are the same rule.
#[derive(Serialize)]
pub struct Expression {
    pub expression: String,
    #[serde(skip)]
    program: Program,
}

impl Expression {
    pub fn compile(expression: &str) -> Result<Expression, String> {
        Ok(Expression {
            expression: expression.to_owned(),
            program: compile(expression)?,
        })
    }

    pub fn execute(&self, context: &Context) -> Result<Value, ExecutionError> {
        execute(&self.program, context)
    }
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expression").field(&self.expression).finish()
    }
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.expression == other.expression
    }
}
impl Eq for Expression {}

impl std::hash::Hash for Expression {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.expression.hash(state);
    }
}

/// Compiles `expression`, or says why it is not CEL.
pub fn compile(expression: &str) -> Result<Program, String> {
    match catch_unwind(|| Program::compile(expression)) {
        Ok(Ok(program)) => Ok(program),
        Ok(Err(err)) => Err(format!("{expression:?} is not a CEL expression: {err}")),
        Err(_) => Err(format!(
            "{expression:?} is not a CEL expression: the parser could not read it"
        )),
    }
}

/// Runs `program` over `context`; an evaluation that panics is an error like any other.
pub fn execute(program: &Program, context: &Context) -> Result<Value, ExecutionError> {
    catch_unwind(AssertUnwindSafe(|| program.execute(context))).unwrap_or_else(|_| {
        Err(ExecutionError::function_error(
            "cel",
            "the expression could not be evaluated",
        ))
    })
}
