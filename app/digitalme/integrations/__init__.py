"""Channels to the platforms where the owner's people are: one package per platform.

Each package (``telegram``, ``slack``, ``github``, ``clickup``) has the same parts and
never imports another package:

* ``webhook``: verify the delivery on its raw bytes (constant-time, failing closed when
  the secret is not set), parse just enough to know what it is, store it in the inbox,
  wake the worker and acknowledge at once;
* ``act``: the worker's side, what the delivery leads to (record activity, ask Claude,
  reply through the platform's API);
* ``channel``: a :class:`~digitalme.integrations.channel.Channel` that says its title,
  whether it is configured, how its readiness reads, which routes it serves (each marked
  as that channel's webhook: marks.py), the conversation a delivery belongs to, the tools
  it gives Claude, whether its events are the owner's activity, and how it processes an
  inbox item;
* ``commands`` (where the platform needs one): its ``digitalme`` commands, listed in
  :mod:`digitalme.integrations.commands`.

``web.CHANNEL_TYPES`` lists the channels; readiness, the worker, the activity digest and
the chat's tools are read from them.

What they share is in :mod:`digitalme.integrations.channel`: the base class,
``ChannelContext`` (the app's stores and clients), request helpers that turn every refusal
into a JSON error and a metric, ``stored_reply``, which asks Claude at most once per
delivery, and ``send_parts``, which sends each part of a reply at most once where the
platform allows. The packages' ``__init__`` modules import nothing: a module of one
(a channel's webhook parsing, say) is imported without the rest of the app.

The channels' settings stay in config.py, with the service's: declared in the packages,
config.py (which nearly every module imports) would import this folder, whose channels
import the chat service and the stores that import config.py: an upward import for every
one of them.
"""
