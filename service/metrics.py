"""The codescaler_* Prometheus metrics, registered on an injected registry.

Buckets are explicit so that dashboards and alerts mean the same thing on every
deployment; an app built in a test gets its own registry. No ``*_created`` series: they
double what a scrape carries and no dashboard or alert reads them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0)
FORWARD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITEM_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
RATIO_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
REWARD_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)


class Metrics:
    """All service metrics; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # prometheus-client has this one process-wide switch (read at each scrape), no per-registry one;
        # every process that builds our metrics serves only ours, so turning it off here is enough.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("codescaler_requests_total", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.items = Counter("codescaler_items_total", "Items by extraction outcome.",
                             ["extraction_status"], registry=r)
        self.request_duration = Histogram("codescaler_request_duration_seconds", "Request latency.",
                                          ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_items = Gauge("codescaler_queue_items", "Items waiting for a forward pass.", registry=r)
        self.batch_items = Histogram("codescaler_batch_items", "Items per batch.", buckets=ITEM_BUCKETS,
                                     registry=r)
        self.batch_tokens = Histogram("codescaler_batch_tokens", "Real tokens per batch.",
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_padding_ratio = Histogram("codescaler_batch_padding_ratio",
                                             "Share of computed token positions that were padding.",
                                             buckets=RATIO_BUCKETS, registry=r)
        self.forward_duration = Histogram("codescaler_forward_duration_seconds", "Model time per batch.",
                                          buckets=FORWARD_BUCKETS, registry=r)
        self.reward = Histogram("codescaler_reward", "Shaped rewards of scored items.",
                                buckets=REWARD_BUCKETS, registry=r)
        self.tokens = Counter("codescaler_tokens_total", "Tokens run through the model.", registry=r)
        self.results_reused = Counter(
            "codescaler_results_reused_total",
            "Items answered without running them: identical to another item of the same batch "
            "(source=batch) or found in the result cache (source=cache).", ["source"], registry=r)
        # --- admission and abuse (issue 12)
        self.admitted_items = Gauge("codescaler_admitted_items",
                                    "Items reserved by admitted requests (preparing, queued or in a forward).",
                                    registry=r)
        self.admitted_tokens = Gauge("codescaler_admitted_tokens",
                                     "Tokens reserved by admitted requests (estimated until tokenized).", registry=r)
        self.refused = Counter("codescaler_refused_total", "Requests refused before any work, by reason.",
                               ["reason"], registry=r)
        self.forged_items = Counter("codescaler_forged_items_total",
                                    "Items whose problem or code spelled a control token or a think tag "
                                    "(tokenized as plain text).", registry=r)
        self.tokenizer_chars = Counter("codescaler_tokenizer_chars_total",
                                       "Characters handed to the tokenizer (a shared problem counts once).",
                                       registry=r)
