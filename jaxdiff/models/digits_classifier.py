"""A small classifier of scikit-learn's digits whose penultimate layer is the feature space of "digits FD".

A ReLU MLP: flattened image -> `hidden_dim` -> `feature_dim` -> 10 class logits. The features are the
penultimate layer before its ReLU: no unit is constant zero there, so feature covariances are not singular. Input: jaxdiff's
digits images [B, R, R, 1] in [-1, 1] (`jaxdiff.data.digits`). An MLP rather than a CNN because it trains in
seconds on a CPU (XLA's CPU convolutions with so few channels are slow to differentiate) and reaches the accuracy of
an RBF SVM within two points on the held-out digits. Trained by `jaxdiff.drivers.digits_metric.train_classifier`.
"""
import flax.linen as nn
import jax.numpy as jnp


class DigitsClassifier(nn.Module):
    """`apply(variables, images) -> logits [B, 10]`; the features [B, feature_dim] are sown as 'penultimate' into the
    'intermediates' collection (`apply(..., mutable=['intermediates'])`, as the denoisers sow their bottleneck)."""
    hidden_dim: int = 256
    feature_dim: int = 64
    num_classes: int = 10

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 1:
            raise ValueError(f'DigitsClassifier expects images [B, R, R, 1], got shape {images.shape}')
        x = jnp.asarray(images, jnp.float32).reshape(len(images), -1)
        x = nn.relu(nn.Dense(self.hidden_dim, name='hidden')(x))
        features = nn.Dense(self.feature_dim, name='features')(x)
        self.sow('intermediates', 'penultimate', features)
        return nn.Dense(self.num_classes, name='logits')(nn.relu(features))
