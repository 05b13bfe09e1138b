//! A test-side AMQP publisher that survives broker restarts.

use std::time::Duration;

use crate::EXCHANGE;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::time::Instant;

pub struct Publisher {
    url: String,
    live: Option<(Connection, Channel)>,
}

impl Publisher {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            live: None,
        }
    }

    async fn channel(&mut self) -> Option<&Channel> {
        if self
            .live
            .as_ref()
            .is_none_or(|(c, ch)| !c.status().connected() || !ch.status().connected())
        {
            self.live = None;
            // Bounded: a connection attempt during a broker restart can hang.
            let open = async {
                let conn = Connection::connect(&self.url, ConnectionProperties::default())
                    .await
                    .ok()?;
                let ch = conn.create_channel().await.ok()?;
                ch.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .ok()?;
                Some((conn, ch))
            };
            self.live = tokio::time::timeout(Duration::from_secs(5), open)
                .await
                .ok()
                .flatten();
        }
        self.live.as_ref().map(|(_, ch)| ch)
    }

    /// Publishes to `saga.events` and waits for the confirm, reconnecting
    /// for up to 60 s; false if it never went through.
    pub async fn publish(
        &mut self,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> bool {
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut props = props
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        // As the services' own user (the one in the URL), so that injected
        // copies and poison are judged on their content, like the events
        // they imitate.
        if props.user_id().is_none() {
            props = props.with_user_id(common::messaging::trust::amqp_user(&self.url).into());
        }
        while Instant::now() < give_up {
            if let Some(ch) = self.channel().await {
                let publish = async {
                    ch.basic_publish(
                        EXCHANGE.into(),
                        routing_key.into(),
                        BasicPublishOptions::default(),
                        body,
                        props.clone(),
                    )
                    .await?
                    .await
                };
                if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(10), publish).await
                    && c.is_ack()
                {
                    return true;
                }
                self.live = None;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        false
    }
}
