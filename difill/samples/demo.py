"""A small inventory module: `difill demo` completes it at the cursor mark."""

from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 0

    def total(self) -> float:
        return self.price * self.quantity


def inventory_value(items: list[Item]) -> float:
    """Sum of the value of every item in stock."""
    value = 0.0
    for item in items:
        value += <|cursor|>
    return value


def cheapest(items: list[Item]) -> Item | None:
    if not items:
        return None
    return min(items, key=lambda item: item.price)
