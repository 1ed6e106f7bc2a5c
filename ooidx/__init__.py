"""The Data Exchange: DX components on the magnet bus."""
