"""What a party raises when a peer fails it: gone, silent, or off the protocol."""

__all__ = ['PeerError', 'DealerError']


class PeerError(RuntimeError):
    """The other party could not be reached, stopped answering, or broke the protocol."""


class DealerError(PeerError):
    """The dealer refused what the owner asked of it, the client found the dealer's requests off its plan, or the
    dealer lost a party before the protocol ended."""
