"""The one contract between the coordinator and a site: every operation's name, request and reply.

Both sides import this package and nothing else of each other. A request is a dataclass of
:mod:`~fednnunet.protocol.messages` (its class names the operation), a reply is the dataclass paired with it;
:mod:`~fednnunet.protocol.envelope` puts them into the JSON body that travels beside the arrays and decodes and
checks them in one place (:mod:`~fednnunet.protocol.codec`), so that no layer reads another's untyped dict.
A failed operation travels as an error with a kind (:class:`~fednnunet.protocol.errors.ErrorKind`), which is what
the coordinator acts on; the message text is for people. :class:`~fednnunet.protocol.caller.SiteCaller` is the
interface every coordinator job (fingerprint, training, find_best_configuration) uses to reach the sites.
"""
