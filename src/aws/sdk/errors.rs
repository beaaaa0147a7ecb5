//! AWS errors as ami-share reports them: one line, the code, whether a retry may help.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use super::*;

/// The message of the deepest error in `error`'s source chain, at most 300 characters.
pub(super) fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let text = cause.to_string();
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// Error codes that mean "slow down": always worth a retry.
pub(super) const THROTTLING_CODES: [&str; 5] = [
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestThrottled",
];

pub(super) fn aws_error<E, R>(
    operation: &'static str,
    region: &str,
    resource: &str,
    error: SdkError<E, R>,
) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    let code = error.code().map(str::to_string);
    let message = match (error.message(), &error) {
        (Some(message), _) => message.to_string(),
        // An answer with no error code: not AWS's error document (a proxy's page, an emulator's crash,
        // a body cut off). Say so, with the status and the innermost cause, not the whole response.
        (None, SdkError::ServiceError(context)) => format!(
            "the answer could not be read (HTTP {}): {}",
            context.raw().status(),
            innermost_cause(context.err())
        ),
        (None, _) => DisplayErrorContext(&error).to_string(),
    };
    let retryable = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(context) => {
            context.raw().status() >= 500
                // No error code: the answer was unreadable, not a refusal; another attempt may read one.
                || code.is_none()
                || code.as_deref().is_some_and(|c| THROTTLING_CODES.contains(&c))
                // Sharing raced the image becoming available: the state-change event or a retry completes it.
                || code.as_deref() == Some("InvalidAMIID.Unavailable")
                // KMS could not reach the key's store in time.
                || code.as_deref() == Some("DependencyTimeoutException")
                // Too many copies in progress: one finishing makes room. From any other call (sharing
                // past the public-AMI quota, say) it is a quota, which no retry raises.
                || (code.as_deref() == Some("ResourceLimitExceeded") && operation == "CopyImage")
                // SSM: another write of the same parameter at that moment (two AMIs of one rule at once);
                // the next attempt reads the parameter again.
                || code.as_deref() == Some("TooManyUpdates")
                // An earlier attempt already made this copy (with other parameters): the next event finds it.
                || code.as_deref() == Some("IdempotentParameterMismatch")
        }
        _ => false,
    };
    AwsError {
        operation,
        region: region.to_string(),
        resource: resource.to_string(),
        code,
        message,
        retryable,
    }
}

/// An answer that lacks what the operation exists for: never acted on, and worth a retry.
pub(super) fn incomplete_answer(
    operation: &'static str,
    region: &str,
    resource: &str,
    missing: &str,
) -> AwsError {
    AwsError {
        operation,
        region: region.to_string(),
        resource: resource.to_string(),
        code: None,
        message: format!("AWS answered without {missing}"),
        retryable: true,
    }
}

/// The HTTP status of a raw response, without naming the SDK's response type in signatures.
pub(super) trait HttpStatus {
    fn status(&self) -> u16;
}

// One type for every SDK crate: the smithy runtime's HTTP response.
impl HttpStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}
