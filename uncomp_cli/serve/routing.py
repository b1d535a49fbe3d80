"""Which engine replica takes a request (Ray Serve's request-router API, the ``ray`` extra).

A request about a document (its key from :func:`~uncomp_cli.serve.replicas.document_key`) goes to
the replica that rendezvous hashing assigns the key: the one whose hash of (key, replica id) is
highest. Every front computes the same owner without talking to the others, and when a replica
is added or replaced only the documents it owned move. If the owner is full (its
``max_ongoing_requests`` reached, by the router's cached queue lengths), the request goes to the
least loaded other replica; otherwise it waits for the owner. A request without a key goes to
the least loaded replica.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def owner(key: str, replica_ids: list[str]) -> str:
    """The replica id (of ``replica_ids``) that owns ``key`` under rendezvous hashing."""
    return max(replica_ids, key=lambda replica: hashlib.sha256(f"{key}\0{replica}".encode()).digest())


class DocumentAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = None if pending_request is None else pending_request.kwargs.get("document")
        if not key:
            return [candidate_replicas]  # one rank: Ray Serve picks its shortest queue
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        first = by_id[owner(key, sorted(by_id))]
        others = [replica for replica in candidate_replicas if replica is not first]
        queued = self.replica_queue_len_cache.get(first.replica_id)
        if others and queued is not None and queued >= first.max_ongoing_requests:
            return [others]  # the owner is full: the least loaded other replica
        # Only the owner otherwise: a rank of several would let Ray Serve move on whenever the
        # owner's queue-length probe is slow (a busy machine), and the document would be read twice.
        return [[first]]
