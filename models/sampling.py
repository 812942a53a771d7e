"""How generation picks each next token, as a pytree of traced settings (gemma's `gm.text` sampling style)."""
import dataclasses
import numbers

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling.

    Both fields are pytree leaves: under jit they are traced, so new values reuse the compiled program."""
    temperature: float | Float[Array, ""] = 0.0
    top_p: float | Float[Array, ""] = 1.0

    def __post_init__(self):
        # only concrete numbers are checked: pytree unflattening rebuilds the class with tracers
        t, p = self.temperature, self.top_p
        if isinstance(t, numbers.Real) and isinstance(p, numbers.Real) and (t < 0 or not 0 < p <= 1):
            raise ValueError(f"temperature {t} must be >= 0 and top_p {p} in (0, 1]")

    @property
    def greedy(self) -> bool:
        """True for temperature 0 (concrete settings only)."""
        return self.temperature == 0

    def as_arrays(self) -> "Sampling":
        """float32 scalars: one jit cache entry for every value (Python floats are weakly typed)."""
        return Sampling(jnp.float32(self.temperature), jnp.float32(self.top_p))

    def __call__(self, logits: Float[Array, "B V"], key: jax.Array) -> Int[Array, "B"]:
        """The next token of each row; one program for greedy and sampling (lax.cond on the temperature)."""
        def nucleus(logits):
            logits = logits / self.temperature
            order = jnp.argsort(-logits, axis=-1)
            sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            drop = jnp.cumsum(probs, axis=-1) - probs > self.top_p  # the most likely token always survives
            choice = jax.random.categorical(key, jnp.where(drop, -jnp.inf, sorted_logits), axis=-1)
            return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

        return jax.lax.cond(self.temperature > 0, nucleus, lambda l: jnp.argmax(l, axis=-1), logits).astype(jnp.int32)


GREEDY = Sampling()
