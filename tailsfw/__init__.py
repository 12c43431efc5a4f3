"""tailsfw: the Tails network filter, enforced with nftables."""
