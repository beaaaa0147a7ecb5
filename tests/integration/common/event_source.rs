//! The SQS event source mapping, played by the test: the function's work queue (and its dead-letter
//! queue) on the emulator's SQS, and a loop that receives messages, delivers them through the Runtime API
//! as Lambda's event source mapping does (the documented SQS event: `Records[]` with `messageId`, `body`,
//! `attributes`, `eventSource: "aws:sqs"`), deletes what the function did not name in
//! `batchItemFailures`, and makes what it named visible again (Lambda waits for the visibility timeout;
//! here it comes back at once).

use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use serde_json::{Value, json};

use super::runtime_api::RuntimeApi;
use super::{Emulator, REGION};

pub struct WorkQueue {
    pub sqs: aws_sdk_sqs::Client,
    pub url: String,
    pub arn: String,
    pub dead_letters: String,
}

/// What draining the queue took.
#[derive(Debug, Default)]
pub struct Drained {
    pub invocations: usize,
    /// Messages delivered (a message delivered again counts again).
    pub delivered: usize,
    /// Messages the function named in `batchItemFailures`.
    pub failed: usize,
    pub answers: Vec<Value>,
}

impl WorkQueue {
    /// A queue whose messages go to the dead-letter queue after `max_receives` receives.
    pub async fn create(emulator: &Emulator, name: &str, max_receives: u32) -> Self {
        let sqs = aws_sdk_sqs::Client::new(&emulator.sdk_config().await);
        let dead_letters = sqs
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_string();
        let dlq_arn = queue_arn(&sqs, &dead_letters).await;
        let url = sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                QueueAttributeName::RedrivePolicy,
                json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receives})
                    .to_string(),
            )
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_string();
        let arn = queue_arn(&sqs, &url).await;
        Self {
            sqs,
            url,
            arn,
            dead_letters,
        }
    }

    pub async fn send(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// Messages in the queue: visible, in flight and delayed.
    pub async fn depth(&self, url: &str) -> usize {
        let attributes = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .unwrap();
        let attributes = attributes.attributes().unwrap();
        [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ]
        .iter()
        .map(|name| {
            attributes
                .get(name)
                .map_or(0, |n| n.parse::<usize>().unwrap())
        })
        .sum()
    }

    /// Receives and delivers until the queue is empty (waiting out delayed messages), `batch_size`
    /// messages to an invocation, each invocation given `time_left`.
    pub async fn drain(
        &self,
        api: &mut RuntimeApi,
        batch_size: i32,
        time_left: Duration,
    ) -> Drained {
        self.drain_with(batch_size, |event| {
            let answer = api.invoke_with(event, time_left);
            assert_eq!(answer.kind, "response", "{answer:?}");
            std::future::ready(answer.body)
        })
        .await
    }

    /// The same, delivering each SQS event through `deliver` (e.g. a handler in the test's process).
    pub async fn drain_with<F, Fut>(&self, batch_size: i32, mut deliver: F) -> Drained
    where
        F: FnMut(Value) -> Fut,
        Fut: std::future::Future<Output = Value>,
    {
        let mut drained = Drained::default();
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the queue did not drain in 5 minutes: {drained:?}"
            );
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(batch_size)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await
                .unwrap();
            let messages = received.messages();
            if messages.is_empty() {
                if self.depth(&self.url).await == 0 {
                    return drained;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let records: Vec<Value> = messages
                .iter()
                .map(|m| {
                    let attributes: serde_json::Map<String, Value> = m
                        .attributes()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.as_str().to_string(), Value::from(v.as_str())))
                        .collect();
                    json!({
                        "messageId": m.message_id(),
                        "receiptHandle": m.receipt_handle(),
                        "body": m.body(),
                        "attributes": attributes,
                        "messageAttributes": {},
                        "md5OfBody": m.md5_of_body(),
                        "eventSource": "aws:sqs",
                        "eventSourceARN": self.arn,
                        "awsRegion": REGION,
                    })
                })
                .collect();
            let answer = deliver(json!({ "Records": records })).await;
            drained.invocations += 1;
            drained.delivered += messages.len();
            let failed: Vec<&str> = answer["batchItemFailures"]
                .as_array()
                .unwrap_or_else(|| panic!("no batchItemFailures: {answer:?}"))
                .iter()
                .map(|f| f["itemIdentifier"].as_str().unwrap())
                .collect();
            drained.failed += failed.len();
            for m in messages {
                let handle = m.receipt_handle().unwrap();
                if failed.contains(&m.message_id().unwrap()) {
                    self.sqs
                        .change_message_visibility()
                        .queue_url(&self.url)
                        .receipt_handle(handle)
                        .visibility_timeout(0)
                        .send()
                        .await
                        .unwrap();
                } else {
                    self.sqs
                        .delete_message()
                        .queue_url(&self.url)
                        .receipt_handle(handle)
                        .send()
                        .await
                        .unwrap();
                }
            }
            drained.answers.push(answer);
        }
    }

    /// The bodies of the messages in the dead-letter queue.
    pub async fn dead_lettered(&self) -> Vec<String> {
        let received = self
            .sqs
            .receive_message()
            .queue_url(&self.dead_letters)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        received
            .messages()
            .iter()
            .map(|m| m.body().unwrap_or_default().to_string())
            .collect()
    }
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone()
}
