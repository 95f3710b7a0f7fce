"""What a party accepts from the other, checked before it acts on it: each message of the agreement and the cost
counters, as a deviating peer could send them (over a stand-in for the link: the checks are the engines' own)."""
import pytest

from timm_mpc.secure import SecureSettings, build_secure_plan
from timm_mpc.secure.errors import PeerError
from timm_mpc.secure.crypten.party import _check_counters
from timm_mpc.secure.protocol import bound_batches
from timm_mpc.secure.secure_vit import CLIENT, OWNER
from timm_mpc.secure.protocol import OwnerLimits, agree, decode_json

from small_models import random_images, small_mpcvit


@pytest.fixture(scope='module')
def plan():
    return build_secure_plan(small_mpcvit(depth=1, embed_dim=16, num_heads=2, attn_pattern='scaling'), SecureSettings())


def _exchange_from(peer_messages, rank):
    """A link on which this party's own messages go nowhere and the peer's come from ``peer_messages``, in order."""
    incoming = iter(peer_messages)

    def exchange(obj, src):
        return obj if src == rank else next(incoming)
    return exchange


@pytest.mark.parametrize('answer', ['accepted', None, [True], {'accepted': 'yes'}, {'accepted': True, 'batches': [0]},
                                   {'accepted': True, 'batches': [2.5]}, {'accepted': True}])
def test_the_owner_refuses_a_client_answer_that_is_not_one(plan, answer):
    with pytest.raises(PeerError, match='the client'):
        agree(_exchange_from([answer], OWNER), OWNER, SecureSettings(), plan, None, False, None)


@pytest.mark.parametrize('settings', ['TTP', None, [1, 2]])
def test_the_client_refuses_settings_that_are_not_a_mapping(settings):
    with pytest.raises(PeerError, match='where its secure settings belong'):
        agree(_exchange_from([settings], CLIENT), CLIENT, SecureSettings(), None, random_images(1), False, None)


def test_batches_beyond_the_owners_bound_are_refused_at_both_ends(plan):
    """The owner's verdict on the client's batches, as agree and each call of a session give it: the owner raises
    with the figure, and the client, told the refusal, stops before any work."""
    settings, limits = SecureSettings(), OwnerLimits(max_batch_size=2)
    with pytest.raises(ValueError, match='a batch of 3 images; the owner accepts at most 2 per batch'):
        bound_batches(_exchange_from([], OWNER), OWNER, [3], plan, settings, limits)
    told = 'a batch of 3 images; the owner accepts at most 2 per batch'
    with pytest.raises(PeerError, match=f'the owner refused the client\'s batches before any work: {told}'):
        bound_batches(_exchange_from([told], CLIENT), CLIENT, [3], plan, settings, None)
    bound_batches(_exchange_from([None], CLIENT), CLIENT, [2], plan, settings, None)  # within the bound: no error


@pytest.mark.parametrize('part', [
    None, {'rows': [1.0]}, {'rows': [1.0, 2.0], 'setup': []}, {'rows': [1.0, float('nan')], 'setup': [1]},
    {'rows': [1.0, -2.0], 'setup': [1]}, {'rows': [1.0, True], 'setup': [1]},
    {'rows': [1.0, 2.0], 'setup': [1], 'dealer': {'bytes': 'many'}},
    {'rows': [1.0, 2.0], 'setup': [1], 'dealer_s': [1.0]},
])
def test_cost_counters_from_the_other_party_are_checked(part):
    with pytest.raises(PeerError, match='cost counters that are not 2 and 1 non-negative numbers'):
        _check_counters(part, 'owner', 2, 1)
    _check_counters({'rows': [1, 2.5], 'setup': [0], 'dealer': {'bytes': 3.0}, 'dealer_s': [0.0, 0.1]}, 'owner', 2, 1)


@pytest.mark.parametrize('data', [b'\x80\x81', b'{"open": ', b"\x80\x04\x95 pickle"])
def test_a_message_that_is_not_json_is_refused_never_run(data):
    with pytest.raises(PeerError, match=f'the owner sent a message that is not JSON \\({len(data)} bytes\\)'):
        decode_json(data, 'owner')
