"""Datasets read from files or built in, never downloaded: the corrupted digits and Fashion-MNIST, which the demo and the study train on."""
from .digits import CORRUPTIONS, DigitsSplit, DigitsTask, corrupted_digits
from .fashion_mnist import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, ImageSplit, ImageTask, fashion_mnist, read_idx
