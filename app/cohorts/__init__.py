"""Cohort membership pushed by Amplitude's Cohort Webhooks, answered without a Profile API call.

How a batch travels: :mod:`~app.cohorts.receiver` authenticates it (``Authorization:
Bearer`` one of ``COHORT_WEBHOOK_SECRETS``), validates it (:mod:`~app.cohorts.payload`) and
queues it in the shared tier; :mod:`~app.cohorts.applier` applies it to the store
(:mod:`~app.cohorts.store`: Redis, the machine's SQLite file, or this process);
:mod:`~app.cohorts.membership` answers from the store only while the cohort is
authoritative. The rules (pairs ordered by ``computed_time``, arming, the full sync,
``COHORT_SETTLE_SECONDS``) are in :mod:`~app.cohorts.rules`; how a lost store is noticed
and recovered from is in :mod:`~app.cohorts.membership`.

**User properties are never served.** A batch carries up to 50 chosen properties, but
only for the users entering or leaving the cohort at that computation: for everyone else
they are as old as the user's last change of membership, with nothing to say how old, and
they are only the few properties chosen for the sync, only for users who were ever in a
synced cohort. Served as a user's ``amp_props`` they would look like a profile and be a
stale fragment of one; a sound rule would need Amplitude to send every member's current
properties at every sync, which it does not. So the receiver checks their bounds (at most
50 per user) and drops them before queueing: they are neither stored nor served, which
also keeps personal data the service does not use out of the shared tier.
"""
